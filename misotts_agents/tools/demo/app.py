"""The demo's web server: the page at ``/`` (static files in ``page/``), ``/api/info``, the WebRTC
signalling routes, and one Pipecat conversation per browser connection, all on one shared engine."""

from __future__ import annotations

import argparse
import contextlib
import logging
from importlib import resources
from typing import Any

from misotts_agents.tools.demo.options import DemoOptions
from misotts_agents.tools.demo.pipeline import build_pipeline, load_engine, run_pipeline
from misotts_agents.tools.demo.services import describe, resolve_llm, resolve_stt
from misotts_agents.tools.demo.webrtc import add_signalling_routes, is_loopback

log = logging.getLogger(__name__)

PAGE_DIR = resources.files("misotts_agents.tools.demo") / "page"


def create_app(options: DemoOptions, engine: Any) -> Any:
    """The FastAPI app: page at /, prebuilt client at /client/, SmallWebRTC signalling at /api/offer."""
    from fastapi import FastAPI
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles
    from pipecat.transports.base_transport import TransportParams
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

    handler: Any = None

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await handler.close()

    app = FastAPI(title="MisoTTS demo", lifespan=lifespan)

    async def run_bot(connection: Any) -> None:
        transport = SmallWebRTCTransport(
            webrtc_connection=connection,
            params=TransportParams(audio_in_enabled=True, audio_out_enabled=True),
        )
        pipeline, _ = build_pipeline(transport, options, engine)
        await run_pipeline(transport, pipeline, options)

    page_dir = str(PAGE_DIR)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(f"{page_dir}/index.html", media_type="text/html")

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return {
            "description": describe(options),
            "model": options.model,
            "stt": resolve_stt(options.stt),
            "llm": resolve_llm(options.llm),
            "tone_conditioning": options.tone_conditioning,
            "watermark": options.watermark,
            "sample_rate": 24000,
        }

    handler = add_signalling_routes(app, run_bot, loopback=is_loopback(options.host))
    app.mount("/page", StaticFiles(directory=page_dir), name="page")
    return app


def serve(options: DemoOptions) -> int:
    """Load the engine, then serve the demo until Ctrl-C."""
    import sys

    import uvicorn
    from loguru import logger  # Pipecat's logger: its DEBUG stream only with --verbose

    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if options.verbose else "INFO")
    engine = load_engine(options)
    app = create_app(options, engine)
    where = "localhost" if is_loopback(options.host) else options.host
    print(f"MisoTTS demo: open http://{where}:{options.port}/ in a browser ({describe(options)})", flush=True)
    if not is_loopback(options.host):
        print(
            "note: browsers only give a page the microphone on https:// or localhost; from another machine, "
            "put the demo behind HTTPS or forward the port (ssh -L). WebRTC across networks may also need "
            "STUN/TURN servers, which this demo does not configure.",
            flush=True,
        )
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning")
    return 0


def main(args: argparse.Namespace) -> int:
    return serve(DemoOptions.from_args(args))

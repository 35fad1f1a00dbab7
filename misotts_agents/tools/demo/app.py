"""The demo's web server: the page at ``/`` (static files in ``page/``), ``/api/info`` (which parts
are real), ``/api/voice`` (a voice clip for a connection's next replies), the WebRTC signalling
routes, and one Pipecat conversation per browser connection, all on one shared engine.

(No ``from __future__ import annotations`` here: FastAPI must see the real types of the route
parameters, which are imported inside :func:`create_app`.)
"""

import argparse
import contextlib
import logging
from importlib import resources
from typing import Any

from misotts_agents.audio import SAMPLE_RATE
from misotts_agents.tools.demo.options import DemoOptions
from misotts_agents.tools.demo.pipeline import build_conversation, load_engine, run_pipeline
from misotts_agents.tools.demo.services import describe, parts, prepare
from misotts_agents.tools.demo.webrtc import add_signalling_routes, is_loopback

log = logging.getLogger(__name__)

PAGE_DIR = resources.files("misotts_agents.tools.demo") / "page"


def create_app(options: DemoOptions, engine: Any) -> Any:
    """The FastAPI app: page at /, prebuilt client at /client/, SmallWebRTC signalling at /api/offer."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from pipecat.transports.base_transport import TransportParams
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

    handler: Any = None

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await handler.close()

    app = FastAPI(title="MisoTTS demo", lifespan=lifespan)

    conversations: dict[str, Any] = {}  # by WebRTC peer connection id, while they run

    async def run_bot(connection: Any) -> None:
        transport = SmallWebRTCTransport(
            webrtc_connection=connection,
            params=TransportParams(audio_in_enabled=True, audio_out_enabled=True),
        )
        conversation = build_conversation(transport, options, engine)
        conversations[connection.pc_id] = conversation
        try:
            await run_pipeline(transport, conversation.pipeline, options)
        finally:
            conversations.pop(connection.pc_id, None)

    page_dir = str(PAGE_DIR)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(f"{page_dir}/index.html", media_type="text/html")

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return {
            "description": describe(options),
            "parts": parts(options),
            "model": options.model,
            "tone_conditioning": options.tone_conditioning,
            "watermark": options.watermark,
            "sample_rate": SAMPLE_RATE,
        }

    @app.post("/api/voice")
    async def voice(request: Request, pc_id: str, text: str) -> JSONResponse:
        """The request body (an audio file) and ``text`` (its transcript) become the voice prompt of
        the conversation ``pc_id`` from its next reply on."""
        from misotts_agents.errors import MisoError
        from misotts_agents.tools.demo.voice import MAX_UPLOAD_BYTES, voice_from_upload

        conversation = conversations.get(pc_id)
        if conversation is None:
            return JSONResponse({"error": f"no running conversation {pc_id!r}"}, status_code=404)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_UPLOAD_BYTES:
            return JSONResponse({"error": f"the clip is larger than {MAX_UPLOAD_BYTES} bytes"}, status_code=413)
        data = await request.body()
        try:
            prompt = voice_from_upload(data, text, conversation.tts.memory.agent_speaker)
        except MisoError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        conversation.controls.set_voice(prompt)
        seconds = len(prompt.audio) / prompt.sample_rate
        log.info("voice clip uploaded: %.1f s, %r (from the next reply)", seconds, prompt.text[:60])
        return JSONResponse({"seconds": round(seconds, 2), "text": prompt.text, "applies": "from the next reply"})

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
    options = prepare(options)  # the speech recognizer and LLM, settled once (a Whisper model fetched, loaded)
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

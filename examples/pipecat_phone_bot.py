"""Phone a MisoTTS voice agent: Twilio Media Streams <-> Pipecat, 8 kHz mu-law, one shared engine.

The server has two endpoints:

- ``/twiml`` (GET or POST): the TwiML Twilio fetches when your number is called. It answers
  ``<Connect><Stream url="wss://<public host>/ws"/></Connect>``, which makes Twilio open a media
  stream WebSocket back to this server.
- ``/ws``: the media stream. Each call runs the same pipeline as ``misotts-agents demo``
  (Silero VAD, STT, LLM or the offline scripted responder, MisoTTSService with tone conditioning),
  through Pipecat's FastAPI WebSocket transport and ``TwilioFrameSerializer``; audio is 8 kHz mu-law
  both ways (MisoTTS's 24 kHz output is resampled by the TTS service).

Run it (``--model DIR`` from ``misotts-agents make-tiny DIR`` works offline on a CPU)::

    uv run python examples/pipecat_phone_bot.py --port 8765 --public-url https://<your-tunnel-host>

Point a Twilio number at it:

1. Make the server reachable over HTTPS/WSS, e.g. ``ngrok http 8765`` or ``cloudflared tunnel --url
   http://localhost:8765``; pass the public ``https://`` URL as ``--public-url`` (without it the
   TwiML uses the request's Host header, which is right behind most tunnels).
2. In the Twilio console: Phone Numbers -> your number -> Voice Configuration -> "A call comes in":
   Webhook, ``https://<public host>/twiml``, HTTP POST. Save, then call the number.
3. Optional: set ``TWILIO_ACCOUNT_SID`` and ``TWILIO_AUTH_TOKEN`` so the call is hung up through
   Twilio's REST API when the pipeline ends (without them the caller hangs up).

Speech recognition and replies are chosen like the demo's (``--stt``, ``--llm``, ``OPENAI_API_KEY``,
``DEEPGRAM_API_KEY``, a local Whisper, a local Ollama...); with none of them the caller hears a
scripted MisoTTS reply to every turn.
"""

import argparse
import json
import logging
import os
from typing import Any
from xml.sax.saxutils import quoteattr

from misotts_agents.tools import demo

TWILIO_SAMPLE_RATE = 8000
log = logging.getLogger("pipecat_phone_bot")


def twiml(stream_url: str) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Connect><Stream url={quoteattr(stream_url)} /></Connect></Response>"
    )


async def read_start(websocket: Any) -> dict:
    """Twilio sends ``connected`` then ``start`` (with the stream and call ids) before any media."""
    while True:
        message = json.loads(await websocket.receive_text())
        if message.get("event") == "start":
            return message["start"]
        if message.get("event") == "stop":
            raise ConnectionError("the media stream stopped before it started")


async def run_call(websocket: Any, options: demo.DemoOptions, engine: Any) -> None:
    """One phone call: Pipecat's WebSocket transport with the Twilio serializer around the demo pipeline."""
    from pipecat.serializers.twilio import TwilioFrameSerializer
    from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport

    start = await read_start(websocket)
    account_sid, auth_token = os.environ.get("TWILIO_ACCOUNT_SID"), os.environ.get("TWILIO_AUTH_TOKEN")
    serializer = TwilioFrameSerializer(
        stream_sid=start["streamSid"],
        call_sid=start.get("callSid"),
        account_sid=account_sid,
        auth_token=auth_token,
        params=TwilioFrameSerializer.InputParams(auto_hang_up=bool(account_sid and auth_token)),
    )
    transport = FastAPIWebsocketTransport(
        websocket=websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer
        ),
    )
    log.info("call %s: stream %s", start.get("callSid"), start["streamSid"])
    pipeline, _ = demo.build_pipeline(transport, options, engine)
    await demo.run_pipeline(
        transport,
        pipeline,
        options,
        audio_in_sample_rate=TWILIO_SAMPLE_RATE,
        audio_out_sample_rate=TWILIO_SAMPLE_RATE,
    )


def create_app(options: demo.DemoOptions, engine: Any, public_url: str | None = None) -> Any:
    from fastapi import FastAPI, Request, WebSocket
    from fastapi.responses import Response

    app = FastAPI(title="MisoTTS phone bot")

    @app.api_route("/twiml", methods=["GET", "POST"])
    async def twiml_endpoint(request: Request) -> Response:
        if public_url:
            base = public_url.rstrip("/").replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        else:
            scheme = "wss" if request.headers.get("x-forwarded-proto", request.url.scheme) == "https" else "ws"
            base = f"{scheme}://{request.headers.get('host', request.url.netloc)}"
        return Response(twiml(f"{base}/ws"), media_type="application/xml")

    @app.websocket("/ws")
    async def media_stream(websocket: WebSocket) -> None:
        await websocket.accept()
        await run_call(websocket, options, engine)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(parser)
    parser.set_defaults(port=8765)
    parser.add_argument("--public-url", help="public https:// base URL Twilio reaches this server at (tunnel)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import uvicorn

    options = demo.prepare(demo.DemoOptions.from_args(args))  # STT and LLM settled once (Whisper loaded)
    engine = demo.load_engine(options)
    app = create_app(options, engine, args.public_url)
    print(f"MisoTTS phone bot on {args.host}:{args.port}: TwiML at /twiml, media stream at /ws", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

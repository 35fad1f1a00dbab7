"""`misotts-agents demo`: talk to MisoTTS from a browser tab, over WebRTC, on this machine.

One process serves everything: a FastAPI app with a small self-contained page at ``/`` (plain
JavaScript, nothing fetched from the internet), Pipecat's prebuilt client at ``/client/`` (needs the
browser to reach Daily's CDN), and the SmallWebRTC offer endpoint ``/api/offer``. Each browser
connection runs its own Pipecat pipeline; all of them share one :class:`MisoEngine`::

    transport.input() -> STT -> user turns (Silero VAD) -> LLM -> MisoTTSService -> transport.output()

Speech recognition and the language model are pluggable and optional:

- ``--llm openai`` (auto when ``OPENAI_API_KEY`` or ``OPENAI_BASE_URL`` is set): any OpenAI-compatible
  chat endpoint (OpenAI, vLLM, llama.cpp, Ollama's ``/v1``). ``--llm scripted`` (auto otherwise): an
  offline responder that answers every user turn with a templated sentence -- it repeats what it
  heard when there is a transcript, otherwise says how long you spoke. No understanding is claimed.
- ``--stt deepgram`` (auto with ``DEEPGRAM_API_KEY`` and the deepgram SDK), ``--stt openai`` (auto
  with ``OPENAI_API_KEY``), ``--stt whisper`` (local faster-whisper, downloads a model once),
  ``--stt none`` (auto otherwise): no words are recognised; each turn is transcribed as the
  placeholder "(user spoke for 2.3 s)" and said so in the log and the page.

Whatever the choice, the *audio* of the user's turn is real, and MisoTTS conditions each reply on it
(tone conditioning). ``--model DIR`` from ``misotts-agents make-tiny DIR`` runs the whole thing on a
CPU with no download (the voice is then noise: the weights are random).

(No ``from __future__ import annotations`` here: FastAPI must see the real types of the route
parameters, which are imported inside :func:`create_app`.)

This module is light to import (``--help`` stays fast); Pipecat, torch and the engine are imported
when a server or pipeline is built. The WebRTC and Twilio examples in ``examples/`` reuse
:func:`build_pipeline` and :func:`run_pipeline`.
"""

import argparse
import contextlib
import functools
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from misotts_agents.model.sources import DEFAULT_MODEL

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_GREETING = "Hi! This is MisoTTS, running on your machine. Say something and I will answer."
DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly voice assistant. Your replies are spoken aloud by a speech synthesizer, so "
    "answer in one to three short, plain sentences without lists, markdown or emoji."
)
STT_CHOICES = ("auto", "none", "deepgram", "openai", "whisper")
LLM_CHOICES = ("auto", "scripted", "openai")
PLACEHOLDER_RE = re.compile(r"\(user spoke for ([0-9.]+) s\)")


@dataclass
class DemoOptions:
    """Everything the demo server and its pipelines are configured with."""

    model: str = DEFAULT_MODEL
    device: str | None = None
    watermark: bool = True
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    stt: str = "auto"
    llm: str = "auto"
    llm_model: str | None = None
    stt_model: str | None = None
    greeting: str = DEFAULT_GREETING
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    tone_conditioning: bool = True
    max_turns: int = 4
    max_sentence_s: float = 20.0
    url: str | None = None  # a `misotts-agents serve` server instead of an engine in this process
    token: str | None = None
    verbose: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DemoOptions":
        return cls(
            model=args.model,
            device=args.device,
            watermark=not args.no_watermark,
            host=args.host,
            port=args.port,
            stt=args.stt,
            llm=args.llm,
            llm_model=args.llm_model,
            stt_model=args.stt_model,
            greeting=args.greeting,
            tone_conditioning=not args.no_tone_conditioning,
            max_turns=args.max_turns,
            max_sentence_s=args.max_sentence_s,
            url=args.url,
            token=args.token,
            verbose=getattr(args, "verbose", False),
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options (shared by ``misotts-agents demo`` and examples/pipecat_webrtc_bot.py)."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="local directory or Hub repo id (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when present)")
    p.add_argument(
        "--url",
        default=None,
        help="speak through a `misotts-agents serve` server (ws://host:8700) instead of a "
        "model loaded here (--model, --device and --no-watermark are then the server's)",
    )
    p.add_argument("--token", default=None, help="the server's bearer token (default: $MISOTTS_TOKEN)")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s, this machine)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    p.add_argument("--no-watermark", action="store_true", help="do not watermark the speech")
    p.add_argument(
        "--stt",
        choices=STT_CHOICES,
        default="auto",
        help="speech recognition: deepgram (DEEPGRAM_API_KEY), openai (OPENAI_API_KEY), whisper (local "
        "faster-whisper), none (placeholder transcripts); auto picks the first that is configured",
    )
    p.add_argument("--stt-model", default=None, help="model name for --stt (service default if unset)")
    p.add_argument(
        "--llm",
        choices=LLM_CHOICES,
        default="auto",
        help="replies: openai (any OpenAI-compatible endpoint: OPENAI_API_KEY, OPENAI_BASE_URL) or scripted "
        "(offline templated answers); auto picks openai when configured",
    )
    p.add_argument("--llm-model", default=None, help="chat model for --llm openai (default: $OPENAI_MODEL or gpt-4.1)")
    p.add_argument("--greeting", default=DEFAULT_GREETING, help="said when a client connects ('' for none)")
    p.add_argument(
        "--no-tone-conditioning", action="store_true", help="do not put the user's turns into the TTS prompt"
    )
    p.add_argument("--max-turns", type=int, default=4, help="conversation turns kept as TTS context (default: 4)")
    p.add_argument(
        "--max-sentence-s",
        type=float,
        default=20.0,
        help="longest audio per sentence, a guard for checkpoints that never stop (default: %(default)s)",
    )


# -- choosing services ------------------------------------------------------------------------


def _importable(module: str) -> bool:
    from importlib.util import find_spec

    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_stt(choice: str) -> str:
    """The STT actually used for ``choice`` ("auto" looks at keys and installed packages)."""
    if choice != "auto":
        return choice
    if os.environ.get("DEEPGRAM_API_KEY") and _importable("deepgram"):
        return "deepgram"
    if os.environ.get("OPENAI_API_KEY"):
        return "openai"
    return "none"


def resolve_llm(choice: str) -> str:
    if choice != "auto":
        return choice
    if os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL"):
        return "openai"
    return "scripted"


def scripted_reply(user_text: str, turn: int) -> str:
    """The offline responder's answer to one user turn (a template, not understanding)."""
    # One turn can hold several VAD segments, each with its own placeholder transcript.
    pieces = PLACEHOLDER_RE.findall(user_text)
    if pieces and not PLACEHOLDER_RE.sub("", user_text).strip():
        seconds = sum(float(p) for p in pieces)
        replies = (
            f"I heard you speak for {seconds:.1f} seconds. I can't make out words without a speech "
            "recognizer, but I am answering in a tone that follows yours.",
            "Thanks! My reply is conditioned on the sound of what you just said.",
            f"That was about {seconds:.0f} seconds of speech. Try a different mood and listen to how I answer.",
        )
        return replies[turn % len(replies)]
    text = " ".join(user_text.split())
    if len(text) > 200:
        text = text[:200].rsplit(" ", 1)[0] + "..."
    return f"You said: {text}" if text else "I didn't catch that."


# -- Pipecat pieces (imported lazily) ---------------------------------------------------------


@functools.cache
def _processors() -> Any:
    """The demo's small Pipecat processors (defined on first use: Pipecat is slow to import)."""
    from pipecat.frames.frames import (
        Frame,
        LLMContextFrame,
        LLMFullResponseEndFrame,
        LLMFullResponseStartFrame,
        LLMTextFrame,
        TranscriptionFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.services.settings import STTSettings
    from pipecat.services.stt_service import SegmentedSTTService
    from pipecat.utils.time import time_now_iso8601

    class PlaceholderSTTService(SegmentedSTTService):
        """No recognizer: each VAD segment becomes the transcript "(user spoke for N s)"."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(settings=STTSettings(model=None, language=None), **kwargs)

        @property
        def wants_wav_segments(self) -> bool:
            return False

        async def run_stt(self, audio: bytes):
            seconds = max(len(audio) / 2 / self.sample_rate - self._trailing_silence_secs, 0.0)
            text = f"(user spoke for {seconds:.1f} s)"
            log.info("user turn: %.1f s of audio, no speech recognizer, transcript placeholder %r", seconds, text)
            yield TranscriptionFrame(text, self._user_id, time_now_iso8601())

    class ScriptedLLM(FrameProcessor):
        """Stands where the LLM goes: answers each user turn with :func:`scripted_reply`."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.turns = 0

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, LLMContextFrame):
                if getattr(frame, "speculation", False):
                    return
                user_text = _last_user_text(frame.context)
                reply = scripted_reply(user_text, self.turns)
                self.turns += 1
                log.info("scripted reply to %r: %r", user_text, reply)
                await self.push_frame(LLMFullResponseStartFrame())
                await self.push_frame(LLMTextFrame(reply))
                await self.push_frame(LLMFullResponseEndFrame())
            else:
                await self.push_frame(frame, direction)

    class SpeechLog(FrameProcessor):
        """After the TTS: logs each reply's audio (seconds, rate) and what it was conditioned on."""

        def __init__(self, tts: Any, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._tts = tts
            self._samples = 0
            self._rate = 0

        async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, TTSStartedFrame):
                self._samples, self._rate = 0, 0
                memory = getattr(self._tts, "memory", None)
                if memory is not None and getattr(self._tts, "tone_conditioning", False):
                    turns = ", ".join(
                        f"{'user' if seg.speaker == memory.user_speaker else 'agent'} "
                        f"{len(seg.audio) / seg.sample_rate:.1f} s {seg.text[:40]!r}"
                        for seg in memory.context()
                    )
                    log.info("reply conditioned on: %s", turns or "nothing yet (first turn)")
            elif isinstance(frame, TTSAudioRawFrame):
                if not self._samples:
                    log.info("MisoTTS audio streaming: %d Hz, %d channel(s)", frame.sample_rate, frame.num_channels)
                self._samples += len(frame.audio) // 2 // max(frame.num_channels, 1)
                self._rate = frame.sample_rate
            elif isinstance(frame, TTSStoppedFrame) and self._rate:
                log.info("MisoTTS spoke %.2f s of audio at %d Hz", self._samples / self._rate, self._rate)
            await self.push_frame(frame, direction)

    return argparse.Namespace(PlaceholderSTTService=PlaceholderSTTService, ScriptedLLM=ScriptedLLM, SpeechLog=SpeechLog)


def _last_user_text(context: Any) -> str:
    for message in reversed(context.get_messages()):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def make_stt(kind: str, model: str | None = None) -> Any:
    """A Pipecat STT service for ``kind`` (already resolved, see :func:`resolve_stt`)."""
    if kind == "none":
        return _processors().PlaceholderSTTService()
    if kind == "deepgram":
        if not _importable("deepgram"):
            raise SystemExit("error: --stt deepgram needs the Deepgram SDK: pip install 'pipecat-ai[deepgram]'")
        from pipecat.services.deepgram.stt import DeepgramSTTService

        return DeepgramSTTService(api_key=_need_env("DEEPGRAM_API_KEY", "--stt deepgram"))
    if kind == "openai":
        from pipecat.services.openai.stt import OpenAISTTService

        settings = OpenAISTTService.Settings(model=model) if model else None
        return OpenAISTTService(
            api_key=_need_env("OPENAI_API_KEY", "--stt openai"),
            base_url=os.environ.get("OPENAI_BASE_URL"),
            settings=settings,
        )
    if kind == "whisper":
        if not _importable("faster_whisper"):
            raise SystemExit("error: --stt whisper needs faster-whisper: pip install 'pipecat-ai[whisper]'")
        from pipecat.services.whisper.stt import WhisperSTTService

        settings = WhisperSTTService.Settings(model=model) if model else None
        return WhisperSTTService(settings=settings)
    raise ValueError(f"unknown STT {kind!r}")


def make_llm(kind: str, model: str | None = None) -> Any:
    if kind == "scripted":
        return _processors().ScriptedLLM()
    if kind == "openai":
        from pipecat.services.openai.llm import OpenAILLMService

        model = model or os.environ.get("OPENAI_MODEL") or "gpt-4.1"
        base_url = os.environ.get("OPENAI_BASE_URL")
        # Local OpenAI-compatible servers (vLLM, llama.cpp, Ollama) accept any key.
        api_key = os.environ.get("OPENAI_API_KEY") or ("unused" if base_url else None)
        if api_key is None:
            raise SystemExit("error: --llm openai needs OPENAI_API_KEY (or OPENAI_BASE_URL for a local server)")
        return OpenAILLMService(api_key=api_key, base_url=base_url, settings=OpenAILLMService.Settings(model=model))
    raise ValueError(f"unknown LLM {kind!r}")


def _need_env(name: str, what: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"error: {what} needs {name} in the environment")
    return value


def describe(options: DemoOptions) -> str:
    """One honest line about what is real in this configuration."""
    stt, llm = resolve_stt(options.stt), resolve_llm(options.llm)
    words = "no speech recognizer (transcripts are placeholders)" if stt == "none" else f"speech recognition: {stt}"
    replies = "scripted replies (templates, no understanding)" if llm == "scripted" else f"replies: {llm} LLM"
    tone = "tone-conditioned on your turns" if options.tone_conditioning else "no tone conditioning"
    voice = f"server {options.url}" if options.url else options.model
    return f"MisoTTS voice ({voice}), {tone}; {words}; {replies}"


# -- engine and pipeline ----------------------------------------------------------------------


def load_engine(options: DemoOptions) -> Any:
    """The process-wide engine for these options, loaded and warmed up (first audio is then prompt);
    None with ``url`` (each pipeline's service connects to the server)."""
    import time

    if options.url:
        return None

    from misotts_agents.engine.registry import shared_engine
    from misotts_agents.engine.request import SynthesisRequest

    start = time.perf_counter()
    engine = shared_engine(options.model, device=options.device, watermark=options.watermark)
    engine.synthesize(SynthesisRequest("Warming up.", max_audio_ms=240, seed=0))
    log.info("engine ready on %s in %.1f s", engine.device, time.perf_counter() - start)
    return engine


def make_tts(options: DemoOptions, engine: Any) -> Any:
    from misotts_agents.pipecat import MisoTTSService

    where: dict[str, Any] = {"url": options.url, "token": options.token} if options.url else {"engine": engine}
    return MisoTTSService(
        model=options.model,
        **where,
        watermark=options.watermark,
        tone_conditioning=options.tone_conditioning,
        max_turns=options.max_turns,
        # Pace generation a little ahead of playback: a barge-in then wastes little GPU work.
        settings=MisoTTSService.Settings(max_audio_ms=options.max_sentence_s * 1000, max_ahead_s=3.0),
    )


def build_pipeline(transport: Any, options: DemoOptions, engine: Any) -> tuple[Any, Any]:
    """The voice-agent pipeline around ``transport``; returns ``(pipeline, context)``."""
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import (
        LLMContextAggregatorPair,
        LLMUserAggregatorParams,
    )

    stt_kind, llm_kind = resolve_stt(options.stt), resolve_llm(options.llm)
    stt = make_stt(stt_kind, options.stt_model)
    llm = make_llm(llm_kind, options.llm_model)
    system = options.system_prompt
    if stt_kind == "none":
        system += (
            " No speech recognizer is running: each user message is only a placeholder such as "
            "'(user spoke for 2.3 s)'. Do not pretend to know what was said."
        )
    messages = [{"role": "system", "content": system}] if llm_kind != "scripted" else []
    context = LLMContext(messages)
    user, assistant = LLMContextAggregatorPair(
        context, user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer())
    )
    tts = make_tts(options, engine)
    # MisoTTSService records the user's turn audio itself: InputAudioRawFrame passes through the STT,
    # the user aggregator and the LLM (or scripted responder) down to it, with the turn frames.
    speech_log = _processors().SpeechLog(tts)
    processors = [transport.input(), stt, user, llm, tts, speech_log, transport.output(), assistant]
    return Pipeline(processors), context


async def run_pipeline(
    transport: Any,
    pipeline: Any,
    options: DemoOptions,
    *,
    audio_in_sample_rate: int = 16000,
    audio_out_sample_rate: int = 24000,
    handle_sigint: bool = False,
) -> None:
    """Run one conversation until the client goes away: greet on connect, cancel on disconnect."""
    from pipecat.frames.frames import TTSSpeakFrame
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.workers.runner import WorkerRunner

    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(
            audio_in_sample_rate=audio_in_sample_rate,
            audio_out_sample_rate=audio_out_sample_rate,
            enable_metrics=True,
        ),
    )

    @transport.event_handler("on_client_connected")
    async def _connected(_transport: Any, _client: Any) -> None:
        log.info("client connected: %s", describe(options))
        if options.greeting:
            await worker.queue_frames([TTSSpeakFrame(options.greeting)])

    @transport.event_handler("on_client_disconnected")
    async def _disconnected(_transport: Any, _client: Any) -> None:
        log.info("client disconnected")
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=handle_sigint)
    await runner.add_workers(worker)
    await runner.run()


# -- the WebRTC server --------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _offer_loopback_candidates() -> None:
    """aioice never offers 127.0.0.1; a server bound to loopback needs it (and it is harmless)."""
    import aioice.ice

    original = aioice.ice.get_host_addresses
    if getattr(original, "_misotts_loopback", False):
        return

    def with_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        found = original(use_ipv4, use_ipv6)
        return ["127.0.0.1", *found] if use_ipv4 else found

    with_loopback._misotts_loopback = True  # type: ignore[attr-defined]
    aioice.ice.get_host_addresses = with_loopback


def create_app(options: DemoOptions, engine: Any) -> Any:
    """The FastAPI app: page at /, prebuilt client at /client/, SmallWebRTC signalling at /api/offer."""
    import uuid

    from fastapi import BackgroundTasks, FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
    from pipecat.transports.base_transport import TransportParams
    from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
    from pipecat.transports.smallwebrtc.request_handler import (
        IceCandidate,
        SmallWebRTCPatchRequest,
        SmallWebRTCRequest,
        SmallWebRTCRequestHandler,
    )
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

    if _is_loopback(options.host):
        _offer_loopback_candidates()
    handler = SmallWebRTCRequestHandler()  # no ICE servers: host candidates only (local use)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await handler.close()

    app = FastAPI(title="MisoTTS demo", lifespan=lifespan)

    async def run_bot(connection: SmallWebRTCConnection) -> None:
        transport = SmallWebRTCTransport(
            webrtc_connection=connection,
            params=TransportParams(audio_in_enabled=True, audio_out_enabled=True),
        )
        pipeline, _ = build_pipeline(transport, options, engine)
        await run_pipeline(transport, pipeline, options)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.replace("{{DESCRIPTION}}", describe(options)))

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

    @app.post("/api/offer")
    async def offer(request: SmallWebRTCRequest, background_tasks: BackgroundTasks) -> Any:
        async def on_connection(connection: SmallWebRTCConnection) -> None:
            background_tasks.add_task(run_bot, connection)

        return await handler.handle_web_request(request=request, webrtc_connection_callback=on_connection)

    @app.patch("/api/offer")
    async def ice_candidate(request: SmallWebRTCPatchRequest) -> dict[str, str]:
        await handler.handle_patch_request(request)
        return {"status": "success"}

    # Pipecat's prebuilt client (/client/) starts with POST /start, then signals through /sessions/<id>/.
    sessions: set[str] = set()

    @app.post("/start")
    async def start() -> dict[str, str]:
        session_id = str(uuid.uuid4())
        sessions.add(session_id)
        return {"sessionId": session_id}

    @app.api_route("/sessions/{session_id}/api/offer", methods=["POST", "PATCH"])
    async def session_offer(session_id: str, request: Request, background_tasks: BackgroundTasks) -> Any:
        if session_id not in sessions:
            return JSONResponse({"error": "unknown session"}, status_code=404)
        data = await request.json()
        if request.method == "POST":
            rtc = SmallWebRTCRequest(
                sdp=data["sdp"], type=data["type"], pc_id=data.get("pc_id"), restart_pc=data.get("restart_pc")
            )
            return await offer(rtc, background_tasks)
        patch = SmallWebRTCPatchRequest(
            pc_id=data["pc_id"], candidates=[IceCandidate(**c) for c in data.get("candidates", [])]
        )
        return await ice_candidate(patch)

    try:
        from pipecat_ai_prebuilt.frontend import PipecatPrebuiltUI

        app.mount("/client", PipecatPrebuiltUI)
    except ImportError:  # the runner extra is optional for the page at /

        @app.get("/client", include_in_schema=False)
        async def no_client() -> RedirectResponse:
            return RedirectResponse("/")

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
    where = "localhost" if _is_loopback(options.host) else options.host
    print(f"MisoTTS demo: open http://{where}:{options.port}/ in a browser ({describe(options)})", flush=True)
    if not _is_loopback(options.host):
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


# -- the page ------------------------------------------------------------------------------------

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MisoTTS demo</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:16px/1.45 system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#222}
 button{font-size:1.1rem;padding:.5rem 1.4rem;border-radius:.4rem;border:1px solid #555;cursor:pointer}
 .meters{display:grid;grid-template-columns:5rem 1fr;gap:.4rem;align-items:center;margin:1rem 0}
 .bar{height:.8rem;background:#eee;border-radius:.4rem;overflow:hidden}
 .bar>div{height:100%;width:0;background:#2a7;transition:width .05s}
 #log{background:#f6f6f6;padding:.6rem;height:16rem;overflow:auto;font:13px/1.4 ui-monospace,monospace}
 .note{color:#666;font-size:.9rem}
</style></head><body>
<h1>MisoTTS demo</h1>
<p class="note">{{DESCRIPTION}}</p>
<p><button id="talk">Start talking</button> <span id="state">idle</span></p>
<div class="meters"><span>you</span><div class="bar"><div id="mic"></div></div>
<span>MisoTTS</span><div class="bar"><div id="bot"></div></div></div>
<div id="log"></div>
<audio id="player" autoplay></audio>
<p class="note">Everything stays on this machine: the page talks WebRTC to the server that served it.
Pipecat's own client is at <a href="/client/">/client/</a> (it loads code from Daily's CDN).</p>
<script>
"use strict";
const miso = window.miso = {state: "idle", connectionState: "new", maxRms: 0, loudFrames: 0,
  firstAudioAt: null, events: [], errors: [], messages: []};
const $ = id => document.getElementById(id);
const t0 = performance.now();
function note(text) {
  const s = ((performance.now() - t0) / 1000).toFixed(2);
  miso.events.push(s + " " + text);
  const line = document.createElement("div"); line.textContent = s + "  " + text;
  $("log").appendChild(line); $("log").scrollTop = 1e9;
}
function setState(s) { miso.state = s; $("state").textContent = s; }
let ctx = null;
function meter(stream, barId, onLevel) {
  const src = ctx.createMediaStreamSource(stream), an = ctx.createAnalyser();
  an.fftSize = 2048; src.connect(an);
  const buf = new Float32Array(an.fftSize);
  setInterval(() => {
    an.getFloatTimeDomainData(buf);
    let sum = 0; for (const v of buf) sum += v * v;
    const rms = Math.sqrt(sum / buf.length);
    $(barId).style.width = Math.min(100, rms * 400) + "%";
    if (onLevel) onLevel(rms);
  }, 50);
}
function onBotLevel(rms) {
  miso.maxRms = Math.max(miso.maxRms, rms);
  if (rms > 0.01) {
    miso.loudFrames += 1;
    if (miso.firstAudioAt === null) { miso.firstAudioAt = (performance.now() - t0) / 1000; note("hearing MisoTTS"); }
  }
}
function rtvi(msg) {
  miso.messages.push(msg.type);
  const d = msg.data || {};
  if (msg.type === "bot-ready") note("bot ready");
  else if (msg.type === "user-started-speaking") note("you started speaking");
  else if (msg.type === "user-stopped-speaking") note("you stopped speaking");
  else if (msg.type === "user-transcription" && d.final) note("you: " + d.text);
  else if (msg.type === "bot-output" && d.text) note("bot: " + d.text);
}
async function waitIce(pc) {
  if (pc.iceGatheringState === "complete") return;
  await new Promise(resolve => {
    const timer = setTimeout(resolve, 3000);
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
    });
  });
}
async function start() {
  $("talk").disabled = true; setState("starting");
  try {
    ctx = new AudioContext(); miso.audioContextRate = ctx.sampleRate;
    const mic = await navigator.mediaDevices.getUserMedia({audio: {echoCancellation: true,
      noiseSuppression: true, autoGainControl: true}});
    note("microphone: " + mic.getAudioTracks()[0].label);
    meter(mic, "mic");
    const pc = window.pc = new RTCPeerConnection({iceServers: []});
    pc.addTransceiver(mic.getAudioTracks()[0], {direction: "sendrecv", streams: [mic]});  // index 0: audio
    pc.addTransceiver("video", {direction: "recvonly"});                                   // index 1: video
    const dc = pc.createDataChannel("chat");
    dc.onopen = () => {
      dc.send(JSON.stringify({label: "rtvi-ai", type: "client-ready", id: "1",
        data: {version: "2.2.0", about: {library: "misotts-demo"}}}));
      setInterval(() => { if (dc.readyState === "open") dc.send("ping: " + Date.now()); }, 1000);
    };
    dc.onmessage = ev => { try { const m = JSON.parse(ev.data); if (m.label === "rtvi-ai") rtvi(m); } catch (e) {} };
    pc.ontrack = ev => {
      if (ev.track.kind !== "audio") return;
      const stream = new MediaStream([ev.track]);
      $("player").srcObject = stream; $("player").play().catch(e => note("autoplay: " + e));
      meter(stream, "bot", onBotLevel);
    };
    pc.onconnectionstatechange = () => {
      miso.connectionState = pc.connectionState; note("connection " + pc.connectionState);
      if (pc.connectionState === "connected") setState("connected: speak now");
      if (pc.connectionState === "failed" || pc.connectionState === "closed") setState(pc.connectionState);
    };
    await pc.setLocalDescription(await pc.createOffer());
    await waitIce(pc);
    const res = await fetch("/api/offer", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({sdp: pc.localDescription.sdp, type: pc.localDescription.type})});
    if (!res.ok) throw new Error("offer rejected: HTTP " + res.status);
    const answer = await res.json();
    await pc.setRemoteDescription({type: answer.type, sdp: answer.sdp});
    setState("connecting");
  } catch (e) {
    miso.errors.push(String(e)); note("error: " + e); setState("error"); $("talk").disabled = false;
  }
}
async function stats() {
  if (!window.pc) return null;
  const out = {};
  (await window.pc.getStats()).forEach(r => {
    if (r.type === "inbound-rtp" && r.kind === "audio") out.inbound = r;
    if (r.type === "codec" && (r.mimeType || "").toLowerCase() === "audio/opus") out.codec = r;
  });
  return out;
}
window.misoStats = stats;
$("talk").onclick = start;
if (new URLSearchParams(location.search).has("autostart")) start();
</script></body></html>
"""

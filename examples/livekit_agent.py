"""A LiveKit voice agent that speaks with MisoTTS, conditioned on the user's tone.

    uv run python examples/livekit_agent.py console          # local mic/speaker, no server
    uv run python examples/livekit_agent.py console --text   # text only (no audio devices)
    uv run python examples/livekit_agent.py dev              # join rooms of LIVEKIT_URL

The LiveKit CLI owns argv, so settings come from the environment:

    MISOTTS_MODEL   model dir or Hub id (default MisoLabs/MisoTTS; `misotts-agents make-tiny DIR`
                    writes an offline test checkpoint)
    MISOTTS_URL     speak through a `misotts-agents serve` server (ws://gpu-box:8700) instead of loading
                    the model in the worker (MISOTTS_TOKEN: its bearer token)
    MISOTTS_DEVICE  cuda / cpu (default: cuda when available)
    MISOTTS_WATERMARK=0   turn the SilentCipher watermark off
    MISOTTS_WORKER  thread (default): every job is a thread of this process and shares one engine;
                    process: LiveKit's process-per-job worker, the engine lives in the worker's
                    shared inference process
    AGENT_STT / AGENT_LLM  LiveKit model strings, e.g. "deepgram/nova-3", "openai/gpt-4.1-mini"
                    (need LiveKit keys). Without AGENT_LLM the agent echoes the user (no keys);
                    without AGENT_STT it only hears typed text (console --text) and still speaks
                    its greeting and replies with MisoTTS.
"""

from __future__ import annotations

import os

from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    Agent,
    AgentServer,
    AgentSession,
    JobContext,
    JobExecutorType,
    cli,
    llm,
    utils,
)

from misotts_agents.livekit import TTS, InferenceEngine, MisoToneMixin, register_inference_runner

MODEL = os.environ.get("MISOTTS_MODEL", "MisoLabs/MisoTTS")
DEVICE = os.environ.get("MISOTTS_DEVICE") or None
WATERMARK = os.environ.get("MISOTTS_WATERMARK", "1") not in ("0", "false", "no")
WORKER = os.environ.get("MISOTTS_WORKER", "thread")
URL = os.environ.get("MISOTTS_URL") or None

if WORKER == "process" and URL is None:
    # Must run on the main thread before the worker starts: importing this file is enough.
    register_inference_runner(MODEL, **({"device": DEVICE} if DEVICE else {}), watermark=WATERMARK)


class EchoLLM(llm.LLM):
    """No-keys stand-in for an LLM: says back what the user said."""

    def chat(self, *, chat_ctx, tools=None, conn_options=DEFAULT_API_CONNECT_OPTIONS, **_kwargs):
        return _EchoStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class _EchoStream(llm.LLMStream):
    async def _run(self) -> None:
        said = next((m.text_content for m in reversed(self._chat_ctx.messages()) if m.role == "user"), None)
        reply = f"You said: {said}" if said else "I did not catch that."
        self._event_ch.send_nowait(
            llm.ChatChunk(id=utils.shortuuid(), delta=llm.ChoiceDelta(role="assistant", content=reply))
        )


class Assistant(MisoToneMixin, Agent):
    def __init__(self) -> None:
        super().__init__(instructions="You are a warm, concise voice assistant. Answer in one or two sentences.")

    async def on_enter(self) -> None:
        self.session.say("Hi! How can I help you today?")


def make_tts() -> TTS:
    if URL is not None:  # the engine is on a server: nothing to load here, in either worker kind
        return TTS(url=URL)
    if WORKER == "process":
        return TTS(MODEL, engine=InferenceEngine())
    return TTS(MODEL, device=DEVICE, watermark=WATERMARK)


server = AgentServer(
    job_executor_type=JobExecutorType.PROCESS if WORKER == "process" else JobExecutorType.THREAD,
    initialize_process_timeout=600.0,  # thread mode loads the model in the first job's setup
)


def setup(_proc) -> None:
    if WORKER != "process":
        make_tts().load_engine()  # the process-wide engine, loaded once (later calls reuse it)


server.setup_fnc = setup


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    options = {"stt": os.environ["AGENT_STT"]} if os.environ.get("AGENT_STT") else {}
    session = AgentSession(llm=os.environ.get("AGENT_LLM") or EchoLLM(), tts=make_tts(), **options)
    await session.start(agent=Assistant(), room=ctx.room)


if __name__ == "__main__":
    cli.run_app(server)

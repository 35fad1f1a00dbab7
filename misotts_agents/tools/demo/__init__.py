"""`misotts-agents demo`: talk to MisoTTS from a browser tab, over WebRTC, on this machine.

One process serves everything: a FastAPI app with a small self-contained page at ``/`` (plain
JavaScript in ``page/``, nothing fetched from the internet), Pipecat's prebuilt client at ``/client/``
(needs the browser to reach Daily's CDN), and the SmallWebRTC offer endpoint ``/api/offer``. Each
browser connection runs its own Pipecat pipeline; all of them share one :class:`MisoEngine`::

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

The modules, one job each: ``options`` (command line, :class:`DemoOptions`), ``services`` (which STT
and LLM, and building them), ``scripted`` (the offline responder's words), ``processors`` (the Pipecat
processors), ``pipeline`` (engine, pipeline, running a conversation), ``webrtc`` (signalling routes,
the aioice patch), ``app`` (the web server) and ``page/`` (the browser page).

This package is light to import (``--help`` stays fast): Pipecat, torch and the engine are imported
when a server or pipeline is built. The WebRTC and Twilio examples in ``examples/`` reuse
:func:`build_pipeline` and :func:`run_pipeline`.
"""

from __future__ import annotations

from misotts_agents.tools.demo.app import create_app, main, serve
from misotts_agents.tools.demo.options import DemoOptions, add_arguments
from misotts_agents.tools.demo.pipeline import (
    Conversation,
    build_conversation,
    build_pipeline,
    load_engine,
    make_tts,
    run_pipeline,
)
from misotts_agents.tools.demo.scripted import scripted_reply
from misotts_agents.tools.demo.services import describe, make_llm, make_stt, prepare, resolve_llm, resolve_stt

__all__ = [
    "Conversation",
    "DemoOptions",
    "add_arguments",
    "build_conversation",
    "build_pipeline",
    "create_app",
    "describe",
    "load_engine",
    "main",
    "make_llm",
    "make_stt",
    "make_tts",
    "prepare",
    "resolve_llm",
    "resolve_stt",
    "run_pipeline",
    "scripted_reply",
    "serve",
]

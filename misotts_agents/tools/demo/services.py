"""Which speech recognizer and which language model a demo conversation gets, and building them.

``auto`` looks at what this machine has (API keys, installed packages); an explicit choice is taken
as is and fails with a clear message when its key or package is missing. Pipecat is imported only
when a service is built.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from misotts_agents.tools.demo.options import DemoOptions

log = logging.getLogger(__name__)


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


def make_stt(kind: str, model: str | None = None) -> Any:
    """A Pipecat STT service for ``kind`` (already resolved, see :func:`resolve_stt`)."""
    if kind == "none":
        from misotts_agents.tools.demo.processors import PlaceholderSTTService

        return PlaceholderSTTService()
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
    """A Pipecat LLM service (or the scripted responder) for ``kind`` (see :func:`resolve_llm`)."""
    if kind == "scripted":
        from misotts_agents.tools.demo.processors import ScriptedLLM

        return ScriptedLLM()
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

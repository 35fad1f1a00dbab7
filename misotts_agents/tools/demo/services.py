"""Which speech recognizer and which language model a demo conversation gets, and building them.

``auto`` takes the first that this machine has:

- speech recognition: Deepgram (``DEEPGRAM_API_KEY`` and its SDK), OpenAI (``OPENAI_API_KEY``), a
  local Whisper (faster-whisper installed: ``pip install 'misotts-agents[whisper]'``; its model comes
  from the Hugging Face cache, downloaded once with a progress bar, or ``--stt-model DIR``), else
  none: placeholder transcripts;
- replies: an OpenAI-compatible endpoint (``OPENAI_API_KEY`` / ``OPENAI_BASE_URL``), a local Ollama
  when one answers on its usual port (``OLLAMA_HOST``, default 127.0.0.1:11434) with a model pulled,
  else the scripted responder.

An explicit choice is taken as is and fails with a clear message when its key, package or server is
missing. :func:`prepare` settles the choice once per process (fetching and loading the Whisper model,
with progress) so each conversation starts at once; :func:`parts` says which parts are real.
Pipecat is imported only when a service is built.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import urllib.request
from typing import Any

from misotts_agents.tools.demo.options import DemoOptions

log = logging.getLogger(__name__)

OLLAMA_PORT = 11434
OLLAMA_PREFERRED = ("llama3.2", "llama3.1", "qwen2.5", "gemma3", "mistral")  # small chat models, in order


def _importable(module: str) -> bool:
    from importlib.util import find_spec

    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# -- local services: are they there? ----------------------------------------------------------


def ollama_url() -> str:
    """Where a local Ollama listens: ``$OLLAMA_HOST`` as Ollama's own clients read it, else its default."""
    host = os.environ.get("OLLAMA_HOST", "").strip() or f"127.0.0.1:{OLLAMA_PORT}"
    if "://" not in host:
        host = f"http://{host}"
    scheme, _, rest = host.partition("://")
    netloc, slash, path = rest.partition("/")
    if netloc.startswith("0.0.0.0"):  # a server's "listen everywhere" address: reach it on loopback
        netloc = "127.0.0.1" + netloc[len("0.0.0.0") :]
    if ":" not in netloc.rsplit("]", 1)[-1]:
        netloc = f"{netloc}:{OLLAMA_PORT}"
    return f"{scheme}://{netloc}{slash}{path}".rstrip("/")


def ollama_models(url: str, timeout: float = 1.0) -> list[str] | None:
    """The models a local Ollama has pulled (its ``/api/tags``), or None when nothing answers there."""
    try:
        with urllib.request.urlopen(f"{url}/api/tags", timeout=timeout) as response:
            data = json.load(response)
        return [str(m["name"]) for m in data.get("models", []) if isinstance(m, dict) and m.get("name")]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def pick_ollama_model(requested: str | None, available: list[str]) -> str | None:
    """``requested`` (with or without its ``:tag``) when pulled, else a small chat model, else the first."""
    if requested:
        for name in available:
            if name == requested or name.split(":")[0] == requested:
                return name
        return None
    for family in OLLAMA_PREFERRED:
        for name in available:
            if name.split(":")[0] == family:
                return name
    return available[0] if available else None


def whisper_problem(model: str | None) -> str | None:
    """Why the local Whisper recognizer cannot run here (None: it can, after a download if needed)."""
    if not _importable("faster_whisper"):
        return "faster-whisper is not installed (pip install 'misotts-agents[whisper]')"
    from misotts_agents.tools.demo.whisper import whisper_cached

    return whisper_cached(model)


# -- the choice -------------------------------------------------------------------------------


def resolve_stt(choice: str, model: str | None = None) -> str:
    """The STT actually used for ``choice`` ("auto" looks at keys and what is installed)."""
    if choice != "auto":
        return choice
    if os.environ.get("DEEPGRAM_API_KEY") and _importable("deepgram"):
        return "deepgram"
    if os.environ.get("OPENAI_API_KEY"):
        return "openai"
    problem = whisper_problem(model)
    if problem is None:
        return "whisper"
    log.debug("no local speech recognizer: %s", problem)
    return "none"


def resolve_llm(choice: str) -> str:
    """The LLM actually used for ``choice`` ("auto" looks at keys and asks a local Ollama)."""
    if choice != "auto":
        return choice
    if os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL"):
        return "openai"
    if ollama_models(ollama_url()):
        return "ollama"
    return "scripted"


def prepare(options: DemoOptions) -> DemoOptions:
    """Settle the services once, before serving: the concrete STT and LLM (and their models), the
    Whisper model fetched (with a progress bar) and loaded. With ``auto``, a local part that fails
    to come up falls back to its offline stand-in, and the log says why."""
    stt = resolve_stt(options.stt, options.stt_model)
    llm = resolve_llm(options.llm)
    stt_model, llm_model = options.stt_model, options.llm_model
    if stt == "whisper":
        from misotts_agents.tools.demo.whisper import DEFAULT_WHISPER, load_whisper

        stt_model = stt_model or DEFAULT_WHISPER
        try:
            load_whisper(stt_model)
        except Exception as exc:
            if options.stt != "auto":
                raise SystemExit(f"error: --stt whisper: {exc}") from exc
            log.warning("local speech recognizer unavailable (%s): transcripts will be placeholders", exc)
            stt, stt_model = "none", None
    if llm == "ollama":
        available = ollama_models(ollama_url()) or []
        llm_model = pick_ollama_model(options.llm_model, available)
        if llm_model is None:
            wanted = f"model {options.llm_model!r}" if options.llm_model else "a model"
            raise SystemExit(
                f"error: --llm ollama needs {wanted} pulled in the Ollama at {ollama_url()} "
                f"(has: {', '.join(available) or 'nothing, or it is not running'}); e.g. `ollama pull llama3.2`"
            )
    return dataclasses.replace(options, stt=stt, llm=llm, stt_model=stt_model, llm_model=llm_model)


# -- building them ----------------------------------------------------------------------------


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
            raise SystemExit("error: --stt whisper needs faster-whisper: pip install 'misotts-agents[whisper]'")
        from misotts_agents.tools.demo.whisper import DEFAULT_WHISPER, local_whisper_stt

        return local_whisper_stt(model or DEFAULT_WHISPER)
    raise ValueError(f"unknown STT {kind!r}")


def make_llm(kind: str, model: str | None = None) -> Any:
    """A Pipecat LLM service (or the scripted responder) for ``kind`` (see :func:`resolve_llm`)."""
    if kind == "scripted":
        from misotts_agents.tools.demo.processors import ScriptedLLM

        return ScriptedLLM()
    if kind == "ollama":
        from pipecat.services.ollama.llm import OLLamaLLMService

        if model is None:
            model = pick_ollama_model(None, ollama_models(ollama_url()) or [])
            if model is None:
                raise SystemExit(f"error: --llm ollama: no model pulled in the Ollama at {ollama_url()}")
        return OLLamaLLMService(base_url=f"{ollama_url()}/v1", settings=OLLamaLLMService.Settings(model=model))
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


# -- saying what is real ----------------------------------------------------------------------


def parts(options: DemoOptions) -> dict[str, dict[str, Any]]:
    """Each part of the conversation: what runs (``what``) and whether it is the real thing (``real``)."""
    stt, llm = resolve_stt(options.stt, options.stt_model), resolve_llm(options.llm)
    if stt == "none":
        hearing = {"real": False, "what": "no speech recognizer: transcripts are placeholders"}
    elif stt == "whisper":
        hearing = {"real": True, "what": f"local Whisper ({options.stt_model or 'default model'})"}
    else:
        hearing = {"real": True, "what": f"{stt} speech recognition"}
    if llm == "scripted":
        replies = {"real": False, "what": "scripted replies (templates, no understanding)"}
    elif llm == "ollama":
        replies = {"real": True, "what": f"local Ollama LLM ({options.llm_model or 'default model'})"}
    else:
        replies = {
            "real": True,
            "what": f"{llm} LLM ({options.llm_model or os.environ.get('OPENAI_MODEL') or 'gpt-4.1'})",
        }
    voice = f"server {options.url}" if options.url else options.model
    speech = {"real": True, "what": f"MisoTTS ({voice})"}
    return {"stt": {"kind": stt, **hearing}, "llm": {"kind": llm, **replies}, "tts": {"kind": "misotts", **speech}}


def describe(options: DemoOptions) -> str:
    """One honest line about what is real in this configuration."""
    p = parts(options)
    tone = "tone-conditioned on your turns" if options.tone_conditioning else "tone conditioning off"
    return f"{p['tts']['what']} voice, {tone}; {p['stt']['what']}; {p['llm']['what']}"

"""The demo's options: the command line (shared by ``misotts-agents demo`` and the example bots) and
the :class:`DemoOptions` every other part of the demo is configured with. Light to import."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from misotts_agents.model.sources import DEFAULT_MODEL

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_GREETING = "Hi! This is MisoTTS, running on your machine. Say something and I will answer."
DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly voice assistant. Your replies are spoken aloud by a speech synthesizer, so "
    "answer in one to three short, plain sentences without lists, markdown or emoji."
)
STT_CHOICES = ("auto", "none", "deepgram", "openai", "whisper")
LLM_CHOICES = ("auto", "scripted", "openai", "ollama")


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
    def from_args(cls, args: argparse.Namespace) -> DemoOptions:
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
        "faster-whisper: pip install 'misotts-agents[whisper]'), none (placeholder transcripts); auto picks "
        "the first that is there",
    )
    p.add_argument(
        "--stt-model",
        default=None,
        help="model for --stt; for whisper a size (small.en, the default; downloaded once into the Hugging "
        "Face cache), a Hub repo id or a local directory",
    )
    p.add_argument(
        "--llm",
        choices=LLM_CHOICES,
        default="auto",
        help="replies: openai (any OpenAI-compatible endpoint: OPENAI_API_KEY, OPENAI_BASE_URL), ollama (a "
        "local Ollama at $OLLAMA_HOST, default 127.0.0.1:11434) or scripted (offline templated answers); "
        "auto picks the first that is there",
    )
    p.add_argument(
        "--llm-model",
        default=None,
        help="chat model: for openai $OPENAI_MODEL or gpt-4.1; for ollama a pulled model (default: llama3.2 "
        "or another pulled chat model)",
    )
    p.add_argument("--greeting", default=DEFAULT_GREETING, help="said when a client connects ('' for none)")
    p.add_argument(
        "--no-tone-conditioning",
        action="store_true",
        help="start with tone conditioning off (the page's switch turns it on and off per reply)",
    )
    p.add_argument("--max-turns", type=int, default=4, help="conversation turns kept as TTS context (default: 4)")
    p.add_argument(
        "--max-sentence-s",
        type=float,
        default=20.0,
        help="longest audio per sentence, a guard for checkpoints that never stop (default: %(default)s)",
    )

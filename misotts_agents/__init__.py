"""misotts-agents: the MisoTTS expressive speech model as a streaming engine for voice agents.

The engine is framework-free; Pipecat and LiveKit integrations build on it. Names are imported
lazily so that `misotts-agents --help` and light imports do not pay for torch, moshi and silentcipher.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "MisoEngine": "engine",
    "SpeechStream": "engine",
    "Synthesis": "engine",
    "ModelConfig": "config",
    "MISOTTS_8B": "config",
    "CSM_1B": "config",
    "Segment": "prompt",
    "ConversationMemory": "conversation",
    "shared_engine": "registry",
    "AudioChunk": "request",
    "ChunkSchedule": "request",
    "StreamStats": "request",
    "SynthesisRequest": "request",
    "MisoError": "errors",
    "ModelSourceError": "errors",
    "CheckpointError": "errors",
    "InvalidRequest": "errors",
    "EngineBusy": "errors",
    "EngineClosed": "errors",
    "EngineStats": "scheduler",
    "VoicePrompt": "voice",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

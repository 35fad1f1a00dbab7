"""misotts-agents: the MisoTTS expressive speech model as a streaming engine for voice agents.

The engine is framework-free; Pipecat and LiveKit integrations build on it. Names are imported
lazily so that `misotts-agents --help` and light imports do not pay for torch and the models;
the ``TYPE_CHECKING`` block below gives editors and type checkers the same names eagerly.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from misotts_agents.engine.memory import ConversationMemory
    from misotts_agents.engine.miso_engine import MisoEngine, SpeechStream
    from misotts_agents.engine.registry import shared_engine
    from misotts_agents.engine.request import (
        AudioChunk,
        ChunkSchedule,
        Segment,
        StreamStats,
        Synthesis,
        SynthesisRequest,
    )
    from misotts_agents.engine.stats import EngineStats
    from misotts_agents.engine.voice import VoicePrompt
    from misotts_agents.errors import (
        CheckpointError,
        EngineBusy,
        EngineClosed,
        InvalidRequest,
        MisoError,
        ModelSourceError,
    )
    from misotts_agents.model.config import CSM_1B, MISOTTS_8B, ModelConfig

_EXPORTS = {
    "MisoEngine": "engine.miso_engine",
    "SpeechStream": "engine.miso_engine",
    "Synthesis": "engine.request",
    "ModelConfig": "model.config",
    "MISOTTS_8B": "model.config",
    "CSM_1B": "model.config",
    "Segment": "engine.request",
    "ConversationMemory": "engine.memory",
    "shared_engine": "engine.registry",
    "AudioChunk": "engine.request",
    "ChunkSchedule": "engine.request",
    "StreamStats": "engine.request",
    "SynthesisRequest": "engine.request",
    "MisoError": "errors",
    "ModelSourceError": "errors",
    "CheckpointError": "errors",
    "InvalidRequest": "errors",
    "EngineBusy": "errors",
    "EngineClosed": "errors",
    "EngineStats": "engine.stats",
    "VoicePrompt": "engine.voice",
}

__all__ = [
    "CSM_1B",
    "MISOTTS_8B",
    "AudioChunk",
    "CheckpointError",
    "ChunkSchedule",
    "ConversationMemory",
    "EngineBusy",
    "EngineClosed",
    "EngineStats",
    "InvalidRequest",
    "MisoEngine",
    "MisoError",
    "ModelConfig",
    "ModelSourceError",
    "Segment",
    "SpeechStream",
    "StreamStats",
    "Synthesis",
    "SynthesisRequest",
    "VoicePrompt",
    "shared_engine",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

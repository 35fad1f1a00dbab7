"""One engine per process: integrations ask here instead of loading their own.

Every Pipecat pipeline and LiveKit job in a process that asks for the same model (and options)
gets the same :class:`MisoEngine`, so the weights are loaded once and all conversations are batched
together.
"""

from __future__ import annotations

import inspect
import threading
from pathlib import Path
from typing import Any

from misotts_agents.engine.miso_engine import MisoEngine
from misotts_agents.model.sources import DEFAULT_MODEL

_engines: dict[tuple, MisoEngine] = {}
_lock = threading.Lock()


def _key(model: str | Path, options: dict[str, Any]) -> tuple:
    """Options as ``MisoEngine.load`` will see them, defaults filled in: leaving an option out and
    passing its default value are the same request for the same engine."""
    bound = inspect.signature(MisoEngine.load).bind(model, **options)
    bound.apply_defaults()
    return tuple((k, repr(v)) for k, v in bound.arguments.items())


def shared_engine(model: str | Path = DEFAULT_MODEL, **options: Any) -> MisoEngine:
    """The process-wide engine for ``model`` and these ``MisoEngine.load`` options (loaded on first use)."""
    key = _key(model, options)
    with _lock:
        engine = _engines.get(key)
        if engine is None or engine.closed:
            engine = MisoEngine.load(model, **options)
            _engines[key] = engine
        return engine


def close_shared_engines() -> None:
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.close()

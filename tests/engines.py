"""Engines on the tiny checkpoint for the test modules that load their own: those that count, patch
or fill what an engine holds, or need other options than the session's shared ``engine`` fixture."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from misotts_agents.engine.miso_engine import MisoEngine


def load_tiny(tiny_dir: Path, **options: Any) -> MisoEngine:
    """A CPU engine without watermark or progress bars, with ``options`` for ``MisoEngine.load``;
    ``with`` closes it."""
    from misotts_agents.engine.miso_engine import MisoEngine

    return MisoEngine.load(tiny_dir, device="cpu", watermark=False, progress=False, **options)

"""The engine's figures: outcome and step counters, and the snapshot ``MisoEngine.metrics`` returns."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Literal

Outcome = Literal["completed", "cancelled", "failed"]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load and throughput."""

    active: int
    queued: int
    max_batch: int
    steps: int
    frames: int
    steps_per_s: float
    frames_per_s: float
    voices_cached: int
    voice_cache_hits: int
    completed: int
    cancelled: int
    failed: int


class EngineCounters:
    """Counted under one lock: the scheduler counts steps and ends, the preparation threads count
    the requests they refuse, and ``snapshot`` reads them from any thread (an unlocked count
    could be lost)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.steps = self.frames = self.completed = self.cancelled = self.failed = 0
        self._step_times: deque[tuple[float, int]] = deque(maxlen=64)  # (when, frames) of recent steps

    def ended(self, outcome: Outcome) -> None:
        with self.lock:
            setattr(self, outcome, getattr(self, outcome) + 1)

    def stepped(self, now: float, frames: int) -> None:
        with self.lock:
            self.steps += 1
            self.frames += frames
            self._step_times.append((now, frames))

    def snapshot(self, active: int, queued: int, max_batch: int, voices: int, voice_hits: int) -> EngineStats:
        with self.lock:
            times = list(self._step_times)
            steps, frames = self.steps, self.frames
            completed, cancelled, failed = self.completed, self.cancelled, self.failed
        span = times[-1][0] - times[0][0] if len(times) > 1 else 0.0
        return EngineStats(
            active=active,
            queued=queued,
            max_batch=max_batch,
            steps=steps,
            frames=frames,
            steps_per_s=(len(times) - 1) / span if span > 0 else 0.0,
            frames_per_s=sum(n for _, n in times[1:]) / span if span > 0 else 0.0,
            voices_cached=voices,
            voice_cache_hits=voice_hits,
            completed=completed,
            cancelled=cancelled,
            failed=failed,
        )

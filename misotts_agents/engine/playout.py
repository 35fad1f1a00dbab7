"""PlayoutClock: where audio handed to a player plays, when the player reports nothing back.

A transport plays audio at real time from when it gets the first piece. When generation runs
ahead, audio queues and plays later than it was handed over; when generation falls behind, the
player runs dry and waits, so later audio plays later than its place in the utterance. Either way
"how much has been heard by now" is not "wall time since the first chunk" (too much when behind)
nor "everything generated" (too much when ahead): it is the audio handed over, less what is still
queued. This clock keeps that account for one utterance (a reply, a turn).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class PlayoutClock:
    """The playback of one utterance's audio, as handed to a real-time player piece by piece.

    ``push(duration_s)`` returns when (seconds after the utterance started playing) that piece will
    start playing; ``heard_s()`` is how much of the audio has been played by now.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.pushed_s = 0.0  # audio handed over so far
        self._started_at: float | None = None
        self._ends_at = 0.0  # when everything handed over will have played

    @property
    def started(self) -> bool:
        return self._started_at is not None

    def push(self, duration_s: float) -> float:
        """Hand over ``duration_s`` of audio; returns its playback start, in seconds from the first."""
        now = self.clock()
        if self._started_at is None:
            self._started_at = self._ends_at = now
        start = max(self._ends_at, now)  # queued behind earlier audio, or played at once after a stall
        self._ends_at = start + duration_s
        self.pushed_s += duration_s
        return start - self._started_at

    def heard_s(self) -> float:
        """Audio played by now: everything handed over except what is still queued."""
        if self._started_at is None:
            return 0.0
        return max(0.0, self.pushed_s - max(0.0, self._ends_at - self.clock()))

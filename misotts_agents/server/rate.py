"""A token bucket: the per-connection message rate limit (connection.py).

Each message costs a token; tokens come back at ``rate`` a second up to ``burst``. A client that
sends faster than that for longer than its burst is out of tokens: its connection gets an ``error``
(``too_many``) and is closed with 1008, so one chatty client costs the others at most ``burst``
messages of the server's time plus ``rate`` a second. Pings count: a flood of cheap messages is
still a flood.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """``take()`` is True while the caller is within ``rate`` per second, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {rate!r}, {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

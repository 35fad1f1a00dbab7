"""Talking to the device without waiting for it: host values in, timings out.

A plain ``torch.tensor(values, device="cuda")`` copies synchronously, so the host waits for every
step already queued; :func:`to_device` queues the copy instead, from pinned memory (a copy from
ordinary memory may still wait while the driver stages it), so the host values may change right
after.

The prefill budget (prefill.py) sizes its passes from the measured time of frame steps and
passes. Timing them with the host's clock means waiting for the device after each one, which on
a GPU is exactly the host sync the overlapped step loop (scheduler.py) must not have. So on CUDA
each measured span is a pair of timing events queued around the work, and its duration is
reported later, by :meth:`DeviceClock.collect`, once the end event has passed; nothing waits.
On CPU the work has finished when its call returns, and the host clock is the device clock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

MAX_PENDING = 64  # spans queued and not yet collected; older ones are dropped (a missed sample, no harm)

Report = Callable[[float], None]


def to_device(values: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` (ints, or a host tensor) on ``device``, the copy queued behind the device's work."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class DeviceClock:
    """Measures spans of device work on the current stream (one thread: the scheduler's)."""

    def __init__(self, device: torch.device) -> None:
        self.events = device.type == "cuda"
        self._pending: deque[tuple[torch.cuda.Event, torch.cuda.Event, Report]] = deque(maxlen=MAX_PENDING)

    @contextmanager
    def measure(self, report: Report) -> Iterator[None]:
        """Time the device work queued inside the block; ``report(seconds)`` is called when known
        (at once on CPU, from a later :meth:`collect` on CUDA). A block that raises is not reported."""
        if not self.events:
            began = time.perf_counter()
            yield
            report(time.perf_counter() - began)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._pending.append((start, end, report))

    def collect(self) -> None:
        """Report every measured span whose work has finished, oldest first; never waits."""
        while self._pending and self._pending[0][1].query():
            start, end, report = self._pending.popleft()
            report(start.elapsed_time(end) / 1000)

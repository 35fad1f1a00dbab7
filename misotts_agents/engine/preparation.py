"""Prompt preparation on a few threads, shared fairly among clients.

Preparing a request (tokenising its text, Mimi-encoding its context and voice audio) takes from a
millisecond to a second or more (minutes of context audio on a CPU). On one thread in submission
order, one client's long context delayed every other client's first audio by that long (measured
through the server: 76 -> 1608 ms). Here a few threads take waiting requests from the clients in
turn (round robin), and no client holds more than all threads but one, so one client's large
request never stands between another client's request and a free thread.

A client is whatever key the caller passes (the server passes its connection); requests without
one are each their own client, which is first come, first served on every thread.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")

PREP_WORKERS = 2  # Mimi encoding runs on the engine's device; two threads keep one free for others


class FairPreparation(Generic[T]):
    """Runs ``work(item)`` on ``workers`` threads, taking items from their clients in turn."""

    def __init__(self, work: Callable[[T], None], workers: int = PREP_WORKERS, name: str = "misotts-prep") -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self._work = work
        self._per_client = max(1, workers - 1)
        self._waiting: OrderedDict[Hashable, deque[T]] = OrderedDict()  # clients with work, in turn order
        self._running: Counter[Hashable] = Counter()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, client: Hashable | None, item: T) -> None:
        """Queue ``item`` for ``client`` (None: a client of its own)."""
        key: Hashable = client if client is not None else object()
        with self._cond:
            if self._closed:
                raise RuntimeError("preparation is shut down")
            self._waiting.setdefault(key, deque()).append(item)
            self._cond.notify()

    def shutdown(self) -> None:
        """Stop taking work, drop what waits (the caller fails those items) and wait for the threads."""
        with self._cond:
            self._closed = True
            self._waiting.clear()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()

    def _take(self) -> tuple[Hashable, T] | None:
        """The next client in turn that may use one more thread, and its oldest item (lock held)."""
        for key, items in self._waiting.items():
            if self._running[key] < self._per_client:
                item = items.popleft()
                if items:
                    self._waiting.move_to_end(key)  # its turn is over: the other clients come first
                else:
                    del self._waiting[key]
                self._running[key] += 1
                return key, item
        return None

    def _loop(self) -> None:
        while True:
            with self._cond:
                taken = None
                while not self._closed and (taken := self._take()) is None:
                    self._cond.wait()
                if taken is None:
                    return
            key, item = taken
            try:
                self._work(item)  # (the engine's work reports its own errors to the request)
            finally:
                taken = item = None  # keep nothing of a finished request (or its client) while waiting
                with self._cond:
                    self._running[key] -= 1
                    if not self._running[key]:
                        del self._running[key]
                    self._cond.notify()  # the client may take another thread now
                key = None

"""A WebSocket connection's send queue (connection.py): bounded in bytes, drained in order by one
writer, so a client that stops reading holds a bounded amount of memory, and is cut off after
``send_timeout_s`` of waiting for room rather than holding its requests' engine slots."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from fastapi import WebSocket, WebSocketDisconnect


class ClientGone(Exception):
    """The client is gone (a send failed), or was cut off for not reading."""


class Outbox:
    """A connection's send queue: bounded in bytes, drained in order by one writer task.

    ``put`` waits while the queue is full; after ``timeout_s`` of waiting it gives up (the client
    is not reading) and calls ``on_stuck``.
    """

    def __init__(self, ws: WebSocket, max_bytes: int, timeout_s: float, on_stuck: Callable[[], None]) -> None:
        self.ws = ws
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._on_stuck = on_stuck
        self._items: deque[str | bytes] = deque()
        self._size = 0
        self._changed = asyncio.Condition()
        self.closed = False

    @property
    def size(self) -> int:
        return self._size

    async def put(self, data: str | bytes) -> None:
        async with self._changed:
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._changed.wait_for(
                        lambda: self.closed or self._size + len(data) <= self.max_bytes or not self._items
                    )
            except TimeoutError:
                self._on_stuck()
                raise ClientGone(f"the client read nothing for {self.timeout_s:g} s") from None
            if self.closed:
                raise ClientGone("connection closed")
            self._items.append(data)
            self._size += len(data)
            self._changed.notify_all()

    async def flushed(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until everything queued is sent."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: self.closed or not self._items)

    async def run(self) -> None:
        """The writer: sends queued items in order until the connection closes."""
        try:
            while True:
                async with self._changed:
                    await self._changed.wait_for(lambda: self.closed or bool(self._items))
                    if self.closed:
                        return
                    data = self._items[0]
                if isinstance(data, bytes):
                    await self.ws.send_bytes(data)
                else:
                    await self.ws.send_text(data)
                async with self._changed:
                    self._items.popleft()
                    self._size -= len(data)
                    self._changed.notify_all()
        except (WebSocketDisconnect, RuntimeError, OSError):  # Starlette: RuntimeError once closed
            pass
        finally:
            await self.close()

    async def close(self) -> None:
        async with self._changed:
            self.closed = True
            self._items.clear()
            self._size = 0
            self._changed.notify_all()

"""Running the server: uvicorn with deadlines against slow clients, and a stop that lets streams finish.

Transport limits (uvicorn's, configured from :class:`Limits`):

- a request's line and headers must arrive within ``header_timeout_s`` of the connection (or of the
  previous response): uvicorn has no such deadline, so :class:`BoundedH11` adds it to its h11
  protocol (a slowloris connection, trickling header bytes, is closed); the same class fixes each
  socket's kernel send buffer at ``socket_send_buffer_bytes``;
- headers larger than ``max_header_bytes`` are refused (h11's own limit, a 400);
- idle keep-alive connections close after ``keep_alive_s``; a WebSocket that stops answering pings
  closes after 20 + 20 s; frames beyond ``ws_max_size`` close their connection (1009);
- more than ``max_connections`` open connections: uvicorn answers further HTTP requests 503, the app
  refuses further WebSockets (1013).

Stopping (:class:`GracefulServer`): SIGTERM or SIGINT stops new work at once (new connections and
requests are refused, ``/health`` says ``draining``), lets running streams finish for up to
``drain_timeout_s``, then ends the rest: a WebSocket request gets an ``error`` (``closed``) and its
connection a close frame (1001), an HTTP stream ends where it is. Then uvicorn stops and the caller
closes the engine. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from misotts_agents.server.protocol import Limits

log = logging.getLogger(__name__)


class Lifecycle:
    """What the server is serving now, so that a stop can wait for it, then end it."""

    def __init__(self) -> None:
        self.draining = False
        self.connections: set[Any] = set()  # connection.Connection
        self.http_streams: set[Any] = set()  # engine streams of running /v1/audio/speech responses

    @property
    def busy(self) -> int:
        return sum(1 for c in self.connections if c.busy) + len(self.http_streams)

    async def drain(self, timeout_s: float) -> None:
        """Refuse new work, wait up to ``timeout_s`` for running streams, then end the rest."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        log.info("stopping: %d streaming clients get %g s to finish", self.busy, timeout_s)
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.busy:
            log.info("stopping: ending %d streaming clients", self.busy)
        for stream in list(self.http_streams):
            stream.cancel()  # the response ends at the engine's next step
        await asyncio.gather(*(c.shutdown() for c in list(self.connections)), return_exceptions=True)
        ends = time.monotonic() + 5.0
        while self.http_streams and time.monotonic() < ends:
            await asyncio.sleep(0.05)


class BoundedH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request line and headers take longer than
    ``header_timeout_s`` (counted from the connection, or from the end of the previous response),
    and with the socket's kernel send buffer fixed at ``send_buffer_bytes`` (autotuned, it grows to
    4 MB per connection on Linux: a client that does not read would park that much, and hide for
    long that it does not read)."""

    header_timeout_s = 10.0
    send_buffer_bytes = 256 * 1024

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
        super().connection_made(transport)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def _watch_headers(self) -> None:
        """Run the deadline while a request's headers are awaited, stop it once they are in."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)
        elif not waiting:
            self._stop_timer()

    def _stop_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
            log.info("closing %s: no complete request headers within %g s", client, self.header_timeout_s)
            self.transport.close()


class OneLineClientErrors(logging.Filter):
    """uvicorn logs a client's malformed WebSocket text (invalid UTF-8) as an ERROR with a traceback,
    though it is the client's fault and uvicorn closes that connection (1007) itself: one WARNING
    line instead, as for every other bad input (README: "one line, no traceback")."""

    MESSAGES = ("Invalid UTF-8 sequence received from client",)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and str(record.msg).startswith(self.MESSAGES):
            reason = record.exc_info[1]
            record.msg = f"{str(record.msg).rstrip('.')}: {reason}; closed it (1007)"
            record.args = ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def uvicorn_config(app: Any, host: str, port: int, limits: Limits, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for ``app`` from ``limits`` (see the module)."""
    settings = {"header_timeout_s": limits.header_timeout_s, "send_buffer_bytes": limits.socket_send_buffer_bytes}
    protocol = type("BoundedH11", (BoundedH11,), settings)
    errors = logging.getLogger("uvicorn.error")  # (the Config below sets up uvicorn's logging; filters stay)
    if not any(isinstance(f, OneLineClientErrors) for f in errors.filters):
        errors.addFilter(OneLineClientErrors())
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        ws="websockets-sansio",
        ws_max_size=limits.ws_max_size,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_keep_alive=max(1, round(limits.keep_alive_s)),
        limit_concurrency=limits.max_connections,
        timeout_graceful_shutdown=2,  # after the app's own drain: what is left is cut
        lifespan="off",
        log_level=log_level,
        server_header=False,
    )


class GracefulServer(uvicorn.Server):
    """uvicorn's server whose SIGTERM / SIGINT drain the app's streams first (see the module)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own handler stops at once and re-raises the signal after the loop ends, which
        # kills the process before the engine is closed; this one drains, and re-raises nothing.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._loop = asyncio.get_running_loop()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: Any) -> None:
        if self._drain_task is not None or self._loop is None:
            log.info("second signal: stopping now")
            self.force_exit = self.should_exit = True
            return
        log.info("%s: draining (up to %g s)", signal.Signals(sig).name, self.drain_timeout_s)
        self._loop.call_soon_threadsafe(self.stop_gracefully)

    def stop_gracefully(self) -> None:
        """Start the drain (from the server's loop); uvicorn stops when it is done."""
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self.lifecycle.drain(self.drain_timeout_s)
        finally:
            self.should_exit = True

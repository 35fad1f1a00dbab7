"""RemoteEngine: a MisoEngine look-alike that runs requests on a ``misotts-agents serve`` server.

It offers :class:`MisoEngine`'s interface: ``stream(request)`` returns an object to ``async for`` or
``for`` (AudioChunk: float32 24 kHz ``pcm``, ``frames``, ``start_frame``, ``final``), with
``cancel()``, ``wait_admitted()``, ``with`` / ``async with``, ``.stats`` and ``.codes`` (an
:class:`~misotts_agents.engine.audio_stream.AudioStream`); ``synthesize(request)`` blocks for
a whole utterance. The engine's figures are the server's ``/metrics``: ``metrics()`` is None here.
One WebSocket connection per RemoteEngine (opened on first use, reopened after a drop) carries
every request, multiplexed by id. The connection belongs to one event loop: the loop of the first
``async for``, or, for blocking use, a loop thread of the RemoteEngine's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import uuid
from collections.abc import Awaitable, Coroutine, Hashable
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from misotts_agents.audio import from_int16
from misotts_agents.engine.audio_stream import Admission, StreamEnd
from misotts_agents.engine.request import AudioChunk, StopReason, StreamStats, Synthesis, SynthesisRequest, join_stream
from misotts_agents.engine.words import WordTiming
from misotts_agents.errors import EngineClosed, MisoError, RemoteError, from_wire
from misotts_agents.server import protocol


class RemoteConnectionError(RemoteError, ConnectionError):
    """The connection to the server failed or dropped; the next request reconnects."""


def _ws_url(url: str) -> str:
    if url.startswith("http://"):
        url = "ws://" + url[len("http://") :]
    elif url.startswith("https://"):
        url = "wss://" + url[len("https://") :]
    if "/v1/stream" not in url:
        url = url.rstrip("/") + "/v1/stream"
    return url


def _running(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this thread is running ``loop`` now."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class RemoteEngine:
    """Client of the engine server's ``/v1/stream`` (see protocol.py), shaped like MisoEngine.

    ``url``: ``ws://host:port`` (or ``http://``; ``/v1/stream`` is added). ``token``: the server's
    bearer token. ``codes``: ask the server for each request's sampled codes (small: K ints a frame).
    """

    def __init__(self, url: str, token: str | None = None, *, codes: bool = True, open_timeout: float = 10.0) -> None:
        self.url = _ws_url(url)
        self.token = token
        self.want_codes = codes
        self.open_timeout = open_timeout
        self._ws: ClientConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock | None = None
        self._streams: dict[str, WebSocketSpeechStream] = {}
        self._known_audio: set[str] = set()  # audio ids the server has been sent on this connection
        self._tasks: set[asyncio.Task[Any]] = set()
        self._blocking_loop: asyncio.AbstractEventLoop | None = None  # for blocking callers (``for``)
        self._blocking_lock = threading.Lock()
        self._closed = False

    # -- MisoEngine's surface ---------------------------------------------------------------

    def stream(self, request: SynthesisRequest, *, client: Hashable | None = None) -> WebSocketSpeechStream:
        """A stream for ``request``; it is sent to the server when first iterated. (The server takes
        its requests in turn with other connections' by this connection and its token's tenant, so
        ``client`` adds nothing here.)"""
        if self._closed:
            raise EngineClosed("the remote engine is closed")
        return WebSocketSpeechStream(self, request)

    def synthesize(self, request: SynthesisRequest) -> Synthesis:
        """A whole utterance, blocking (on this engine's own loop thread); not from inside a loop."""
        return join_stream(self.stream(request))

    def _blocking(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` for a blocking caller, on this engine's own event loop thread."""
        with self._blocking_lock:
            if self._blocking_loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="misotts-remote", daemon=True).start()
                self._blocking_loop = loop
            loop = self._blocking_loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def metrics(self) -> None:
        """Engine figures are on the server's ``/metrics`` (Prometheus); not fetched here."""
        return None

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Cancel running requests and close the connection (in the background when called inside a loop)."""
        loop, self._blocking_loop = self._blocking_loop, None
        if loop is not None and not _running(loop):  # blocking use: close on the own loop thread, then end it
            with contextlib.suppress(Exception):  # best effort: the connection is going away either way
                asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        if self._closed:
            return
        self._closed = True
        for stream in list(self._streams.values()):
            stream._push(EngineClosed("the remote engine was closed"))
        self._streams.clear()
        ws, self._ws = self._ws, None
        if ws is not None and self._loop is not None and not self._loop.is_closed():
            self._spawn(ws.close())

    async def aclose(self) -> None:
        ws = self._ws
        self.close()
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> RemoteEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def connect(self) -> None:
        """Open the connection now, so that the first reply does not pay for the handshake."""
        await self._connection()

    # -- connection -------------------------------------------------------------------------

    async def _connection(self) -> ClientConnection:
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop and self._ws is not None and self._loop.is_running():
            raise RuntimeError(
                "this RemoteEngine's connection belongs to another running event loop: make one RemoteEngine "
                "(one TTS service) per event loop, e.g. per LiveKit job"
            )
        if self._loop is not loop:  # first use, or the old loop is gone: start afresh
            self._loop, self._ws, self._reader, self._connecting = loop, None, None, asyncio.Lock()
        assert self._connecting is not None
        async with self._connecting:
            if self._ws is None:
                headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
                try:
                    self._ws = await connect(
                        self.url,
                        additional_headers=headers,
                        open_timeout=self.open_timeout,
                        max_size=None,
                        compression=None,
                    )
                except Exception as exc:  # refused, timed out, or an HTTP status refusing the handshake
                    raise RemoteConnectionError(f"cannot connect to {self.url}: {exc}", "connection") from exc
                self._known_audio = set()
                self._reader = asyncio.create_task(self._read(self._ws))
            return self._ws

    async def _read(self, ws: ClientConnection) -> None:
        lost: MisoError = RemoteConnectionError("connection closed", "connection")
        try:
            async for data in ws:
                if isinstance(data, bytes):
                    rid, start, frames, final, pcm = protocol.unpack_audio(data)
                    stream = self._streams.get(rid)
                    if stream is not None:
                        words, stream._words = stream._words, ()  # from the words message just before
                        stream._push(AudioChunk(from_int16(pcm), start, frames, final, words=words))
                    continue
                msg = json.loads(data)
                stream = self._streams.get(msg.get("id") or "")
                if stream is None:
                    continue
                if msg.get("type") in ("queued", "admitted"):
                    stream._queue_news(msg["type"])
                elif msg.get("type") == "words":
                    try:
                        stream._words = protocol.parse_words(msg)
                    except protocol.ProtocolError as exc:
                        stream._push(RemoteError(f"bad words message from the server: {exc}"))
                elif msg.get("type") == "end":
                    stream._finish(msg)
                elif msg.get("type") == "error" and msg.get("code") == "unknown_audio" and not stream._resent:
                    stream._resent = True  # the server dropped audio we referred to: send it all again
                    self._spawn(stream._send_start(full=True))
                elif msg.get("type") == "error":
                    stream._push(from_wire(msg.get("code", "internal"), msg.get("message", "")))
        except ConnectionClosed as exc:
            lost = self._closed_error(exc)
        finally:
            if self._ws is ws:
                self._ws = None
            for rid, stream in list(self._streams.items()):
                if stream._conn is ws:
                    self._streams.pop(rid, None)
                    stream._push(lost)

    async def _send(self, ws: ClientConnection, text: str) -> None:
        try:
            await ws.send(text)
        except ConnectionClosed as exc:
            raise self._closed_error(exc) from exc

    def _closed_error(self, exc: ConnectionClosed) -> MisoError:
        """Why the connection closed, as the error for its requests: a refused token is not retryable."""
        if exc.rcvd is not None and exc.rcvd.code == 1008 and exc.rcvd.reason == protocol.CLOSE_MESSAGE_RATE:
            return from_wire("too_many", f"{self.url} closed the connection: over its message rate limit")
        if exc.rcvd is not None and exc.rcvd.code == 1008:
            return RemoteError(f"{self.url} refused the connection: {exc.rcvd.reason}", "unauthorized")
        if exc.rcvd is not None and exc.rcvd.code == 1013:  # the server's connection limits: retry later
            return from_wire("too_many", f"{self.url} refused the connection: {exc.rcvd.reason}")
        return RemoteConnectionError(f"connection to {self.url} lost: {exc}", "connection")

    def _spawn(self, coro: Awaitable[Any]) -> None:
        async def quiet() -> None:
            with contextlib.suppress(Exception):
                await coro

        assert self._loop is not None
        if _running(self._loop):
            task = self._loop.create_task(quiet())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            asyncio.run_coroutine_threadsafe(quiet(), self._loop)


class WebSocketSpeechStream:
    """One request on the server: ``async for`` its AudioChunks; ``cancel()`` stops it there too."""

    def __init__(self, engine: RemoteEngine, request: SynthesisRequest) -> None:
        self.engine = engine
        self.request = request
        self.id = uuid.uuid4().hex
        self.stats = StreamStats(seed=request.seed or 0)
        self._queue: asyncio.Queue[Any] | None = None
        self._pending: list[Any] = []
        self._conn: ClientConnection | None = None
        self._codes: np.ndarray | None = None
        self._started = False
        self._resent = False
        self._words: tuple[WordTiming, ...] = ()  # from a words message, for the next audio frame
        self._queued = False  # the server said it waits for a slot, and has not said it has one yet
        self._admission = Admission()
        self._ended = False
        self._cancelled = False

    # -- fed by the reader --------------------------------------------------------------------

    def _push(self, item: Any) -> None:
        self._admit(isinstance(item, AudioChunk))  # audio comes from a slot; an end or error before it: none
        if self._queue is None:
            self._pending.append(item)
        else:
            self._queue.put_nowait(item)

    def _finish(self, msg: dict[str, Any]) -> None:
        self.engine._streams.pop(self.id, None)
        s = msg.get("stats") or {}
        for key in ("seed", "frames", "prompt_frames", "dropped_segments", "invalid_codes"):
            if isinstance(s.get(key), int):
                setattr(self.stats, key, s[key])
        for key in ("queued_s", "time_to_first_audio_s", "elapsed_s"):
            if s.get(key) is not None:
                setattr(self.stats, key, float(s[key]))
        self.stats.stop_reason = str(s.get("stop_reason", StopReason.EOS))  # the wire string, as the server sent it
        if msg.get("codes") is not None:
            self._codes = protocol.codes_array(msg["codes"])
        self._push(StreamEnd(self.stats.stop_reason))

    def _queue_news(self, kind: str) -> None:
        """The server's ``queued`` (it waits for a slot) or ``admitted`` (it has one) message."""
        if kind == "admitted":
            self._admit(True)
        elif not self._admission.settled:
            self._queued = True

    def _admit(self, admitted: bool) -> None:
        """The server's ``admitted`` message, the first audio (True), or the end (False) settles it."""
        self._queued = False
        self._admission.settle(admitted)

    # -- caller side ------------------------------------------------------------------------

    @property
    def queued(self) -> bool:
        """Waiting for a slot on the server, as the server said (``queued``, then ``admitted``)."""
        return self._queued

    async def wait_admitted(self) -> bool:
        """True once the server said the request has a slot (or sent its audio), False if it ended
        without one. Settled as the stream is iterated (the request is sent on its first step)."""
        return await self._admission.wait()

    @property
    def codes(self) -> np.ndarray:
        """The sampled codes (frames, K) once the request ended, when the server sent them; else empty."""
        return self._codes if self._codes is not None else protocol.codes_array(None)

    @property
    def done(self) -> bool:
        return self._ended

    async def _start(self) -> None:
        self._started = True
        self._queue = asyncio.Queue()
        for item in self._pending:
            self._queue.put_nowait(item)
        self._pending.clear()
        ws = await self.engine._connection()
        self._conn = ws
        self.engine._streams[self.id] = self
        try:
            await self._send_start()
        except BaseException:
            self.engine._streams.pop(self.id, None)
            raise

    async def _send_start(self, full: bool = False) -> None:
        """Send the start; audio the server already has goes by id unless ``full``."""
        if self._cancelled:
            return
        sent: set[str] = set() if full else self.engine._known_audio
        text = protocol.start_message(
            self.id, self.request, codes=self.engine.want_codes, known=sent, words=True, queue=True
        )
        if full:
            self.engine._known_audio |= sent
        assert self._conn is not None
        await self.engine._send(self._conn, text)

    def __aiter__(self) -> WebSocketSpeechStream:
        return self

    def __iter__(self) -> WebSocketSpeechStream:
        return self

    def __next__(self) -> AudioChunk:
        try:
            return self.engine._blocking(self.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    async def __anext__(self) -> AudioChunk:
        if self._ended or self._cancelled:
            raise StopAsyncIteration
        try:
            if not self._started:
                await self._start()
            assert self._queue is not None
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        except BaseException:  # a failed connection or start
            self._ended = True
            self._admit(False)
            raise
        if isinstance(item, AudioChunk):
            if self.stats.time_to_first_audio_s is None:
                self.stats.time_to_first_audio_s = 0.0  # replaced by the server's figure at the end
            return item
        self._ended = True
        if isinstance(item, BaseException):
            self.stats.stop_reason = StopReason.ERROR
            raise item
        raise StopAsyncIteration

    def cancel(self) -> None:
        """Stop the request; the server frees its slot at the next frame step. Safe to repeat."""
        if self._cancelled or self._ended:
            return
        self._cancelled = True
        self.stats.stop_reason = StopReason.CANCELLED
        self._admit(False)
        self.engine._streams.pop(self.id, None)
        if self._started and self._conn is not None:
            self.engine._spawn(self._conn.send(protocol.message("cancel", id=self.id)))

    close = cancel

    async def aclose(self) -> None:
        self.cancel()

    def __enter__(self) -> WebSocketSpeechStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    async def __aenter__(self) -> WebSocketSpeechStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

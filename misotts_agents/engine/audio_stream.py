"""AudioStream: what every stream of one request's audio offers its caller, wherever it is generated.

The engine's :class:`~misotts_agents.engine.stream.SpeechStream`, the server client's stream, a
server session's stream, the Ray ingress's stream and the LiveKit inference process's stream all
have this shape, so a caller (the integrations, the server's connection) is written once against
it. Admission is awaited, never polled: a busy engine delays a request's first audio without it
having failed, so a caller's timeout for that audio starts once the request has a slot
(:func:`first_chunk`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from misotts_agents.engine.request import AudioChunk, StreamStats, SynthesisRequest


class AudioStream(Protocol):
    """One request's audio: ``async for`` its :class:`AudioChunk` s; ``cancel()`` stops it (its slot
    is freed at the engine's next frame step) and is safe to repeat."""

    @property
    def stats(self) -> StreamStats: ...

    @property
    def queued(self) -> bool:
        """Waiting for an engine slot now (False once it has one, has ended, or cannot tell)."""
        ...

    async def wait_admitted(self) -> bool:
        """True once the request has an engine slot, False if it ended without one. A stream fed by
        its iteration (over a server, Ray or LiveKit's IPC) settles it while it is iterated."""
        ...

    def cancel(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[AudioChunk]: ...

    async def __anext__(self) -> AudioChunk: ...


class AudioSource(Protocol):
    """What takes requests: :class:`~misotts_agents.MisoEngine`, the server client
    (:class:`~misotts_agents.server.RemoteEngine`) and LiveKit's ``InferenceEngine`` all fit."""

    def stream(self, request: SynthesisRequest, *, client: Hashable | None = None) -> AudioStream:
        """Submit ``request``; ``client`` (e.g. the integration instance of one conversation) is whose
        request it is, for the engine's fair admission (an engine over a server or LiveKit's IPC keys
        by its connection or job instead)."""
        ...


@dataclass(frozen=True)
class StreamEnd:
    """The item that ends a stream's queue of chunks: how the request ended."""

    reason: str


class Admission:
    """A stream's admission as the messages of its iteration tell it, for ``wait_admitted``: settled
    once, True (the request has a slot) or False (it ended without one); later news is ignored."""

    def __init__(self) -> None:
        self._admitted: bool | None = None
        self._news = asyncio.Event()

    @property
    def settled(self) -> bool:
        return self._admitted is not None

    def settle(self, admitted: bool) -> None:
        if self._admitted is None:
            self._admitted = admitted
            self._news.set()

    async def wait(self) -> bool:
        await self._news.wait()
        return bool(self._admitted)


async def first_chunk(stream: AudioStream, chunks: AsyncIterator[AudioChunk], timeout: float) -> AudioChunk:
    """The first chunk of ``chunks`` (``stream``'s iterator), or TimeoutError when it takes longer
    than ``timeout`` counted from the request's admission; StopAsyncIteration when there is none."""
    pending = asyncio.ensure_future(anext(chunks))
    admission = asyncio.ensure_future(stream.wait_admitted())
    try:
        await asyncio.wait({pending, admission}, return_when=asyncio.FIRST_COMPLETED)
        if not pending.done():  # admitted (or ended without a slot): the clock starts now
            await asyncio.wait({pending}, timeout=timeout)
        if not pending.done():
            raise TimeoutError
        return pending.result()
    finally:
        for task in (pending, admission):
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task


if TYPE_CHECKING:  # pyright checks every stream and every engine-like class against the protocols here
    from misotts_agents.engine.miso_engine import MisoEngine
    from misotts_agents.engine.stream import SpeechStream
    from misotts_agents.livekit.inference_process import InferenceEngine, InferenceProcessStream
    from misotts_agents.server.client import RemoteEngine, WebSocketSpeechStream
    from misotts_agents.server.ray.stream import ReplicaStream
    from misotts_agents.server.sessions import SessionStream

    _STREAMS: tuple[type[AudioStream], ...] = (
        SpeechStream,
        WebSocketSpeechStream,
        SessionStream,
        ReplicaStream,
        InferenceProcessStream,
    )
    _SOURCES: tuple[type[AudioSource], ...] = (MisoEngine, RemoteEngine, InferenceEngine)

"""ReplicaStream: one ``start`` run on an engine replica, seen from the ingress like an engine stream."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from ray.serve.exceptions import RequestCancelledError

from misotts_agents.engine.request import AudioChunk, StopReason, StreamStats
from misotts_agents.server import protocol
from misotts_agents.server.ray.transport import ADMITTED, error_from_item, transport_error

if TYPE_CHECKING:
    from misotts_agents.server.ray.ingress import RayEngineBackend
    from misotts_agents.server.schema import Start


@dataclasses.dataclass
class ReplicaStreamStats(StreamStats):
    """StreamStats plus the replica that generated the audio."""

    replica: str | None = None


class ReplicaStream:
    """One ``start`` run on an engine replica, shaped like the engine's stream: ``async for`` its
    AudioChunks; ``wait_admitted()`` for its slot (the replica's ``admitted`` item); ``stats`` and
    ``codes`` once it ended; ``cancel()`` cancels the replica's call, which stops the engine request
    and frees its slot there."""

    def __init__(
        self, backend: RayEngineBackend, start: Start, client: str | None = None, tenant: str | None = None
    ) -> None:
        self.backend = backend
        self.start = start
        self.client = client
        self.tenant = tenant
        # The sampling fields are made at import (schema.SamplingFields): unknown to the type checker.
        self.stats = ReplicaStreamStats(seed=getattr(start, "seed", None) or 0)
        self._codes: list[list[int]] | None = None
        self._call: Any = None
        self._held: Any = None  # an item wait_admitted read past the admission, for __anext__
        self._admitted: bool | None = None
        self._submitted = 0.0
        self._done = False
        self._cancelled = False
        self._reading = asyncio.Lock()  # one reader of the replica's items at a time

    @property
    def replica(self) -> str | None:
        return self.stats.replica

    @property
    def codes(self) -> np.ndarray:
        return protocol.codes_array(self._codes)

    @property
    def queued(self) -> bool:
        """Not yet known to have a slot on its replica (and not over)."""
        return self._admitted is None and not self._done and not self._cancelled

    async def wait_admitted(self) -> bool:
        """True once the replica's engine gave the request a slot, False if it ended without one
        (its error comes from the next ``__anext__``). It reads the replica's first item itself
        when nobody iterates yet (an HTTP status waits for it before the body is read)."""
        while self._admitted is None and self._held is None and not (self._done or self._cancelled):
            async with self._reading:
                if self._admitted is None and self._held is None and not (self._done or self._cancelled):
                    item = await self._receive()
                    if item == ADMITTED:
                        self._admitted = True
                    else:
                        self._held = item
        return bool(self._admitted)

    def __aiter__(self) -> ReplicaStream:
        return self

    async def __anext__(self) -> AudioChunk:
        item: Any = ADMITTED
        while item == ADMITTED:  # once, before any audio (the lock is let go after it: wait_admitted)
            async with self._reading:
                if self._held is not None:
                    item, self._held = self._held, None
                elif self._done or self._cancelled:
                    raise StopAsyncIteration
                else:
                    item = await self._receive()
            if item == ADMITTED:
                self._admitted = True
        if isinstance(item, AudioChunk):
            if self.stats.time_to_first_audio_s is None:
                self.stats.time_to_first_audio_s = time.perf_counter() - self._submitted
            self.stats.frames += item.frames
            return item
        self._done = True
        if item[0] == "end":
            _, stats, codes, figures = item
            for key, value in stats.items():
                setattr(self.stats, key, value)
            self.stats.replica = figures["replica"]
            self._codes = codes
            self.backend.heard(figures, self.start.session)
            raise StopAsyncIteration
        self.stats.stop_reason = StopReason.ERROR
        raise error_from_item(item)

    async def _receive(self) -> Any:
        """The replica's next item (the call made on the first), transport failures as their errors."""
        if self._call is None:
            self._submitted = time.perf_counter()
            handle = self.backend.call(self.start.session, stream=True)
            self._call = handle.start.remote(self.start, self.client, self.tenant)
        try:
            return await self._call.__anext__()
        except StopAsyncIteration:
            self._done = True
            raise RuntimeError("the engine replica ended the stream without its end") from None
        except (asyncio.CancelledError, RequestCancelledError):
            self.cancel()
            raise
        except Exception as exc:
            self._done = True
            self.stats.stop_reason = StopReason.ERROR
            raise transport_error(exc) from exc

    def cancel(self) -> None:
        """Stop the request: Serve cancels the replica's call (a CancelledError in its generator)."""
        if self._cancelled or self._done:
            return
        self._cancelled = True
        self.stats.stop_reason = StopReason.CANCELLED
        if self._call is not None:
            self._call.cancel()

    close = cancel

    async def aclose(self) -> None:
        self.cancel()

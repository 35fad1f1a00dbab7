"""ReplicaStream: one ``start`` run on an engine replica, seen from the ingress like an engine stream."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from ray.serve.exceptions import RequestCancelledError

from misotts_agents.engine.audio_stream import Admission
from misotts_agents.engine.request import AudioChunk, StreamStats
from misotts_agents.server import protocol
from misotts_agents.server.ray.transport import error_from_item, transport_error

if TYPE_CHECKING:
    from misotts_agents.server.ray.ingress import RayEngineBackend


@dataclasses.dataclass
class ReplicaStreamStats(StreamStats):
    """StreamStats plus the replica that generated the audio."""

    replica: str | None = None


class ReplicaStream:
    """One ``start`` run on an engine replica, shaped like the engine's stream (an
    :class:`~misotts_agents.engine.audio_stream.AudioStream`): ``async for`` its AudioChunks; ``stats``
    and ``codes`` once it ended; ``cancel()`` cancels the replica's call, which stops the engine
    request and frees its slot there. Its admission is the replica's first item, so it is settled
    while the stream is iterated."""

    def __init__(
        self, backend: RayEngineBackend, msg: dict[str, Any], sid: str | None, client: str | None = None
    ) -> None:
        self.backend = backend
        self.msg = msg
        self.client = client
        self.sid = sid
        seed = msg.get("seed")
        self.stats = ReplicaStreamStats(seed=seed if isinstance(seed, int) else 0)
        self._codes: list[list[int]] | None = None
        self._call: Any = None
        self._submitted = 0.0
        self._done = False
        self._cancelled = False
        self._admission = Admission()

    @property
    def replica(self) -> str | None:
        return self.stats.replica

    @property
    def codes(self) -> np.ndarray:
        return protocol.codes_array(self._codes)

    @property
    def queued(self) -> bool:
        """Until the replica says the request has a slot (or it ends), it waits for one."""
        return not self._admission.settled

    async def wait_admitted(self) -> bool:
        return await self._admission.wait()

    def __aiter__(self) -> ReplicaStream:
        return self

    async def __anext__(self) -> AudioChunk:
        if self._done or self._cancelled:
            raise StopAsyncIteration
        if self._call is None:
            self._submitted = time.perf_counter()
            self._call = self.backend.call(self.sid, stream=True).start.remote(self.msg, self.client)
        item = await self._next_item()
        if isinstance(item, tuple) and item[0] == "admitted":
            self._admission.settle(item[1])
            item = await self._next_item()
        if isinstance(item, AudioChunk):
            if self.stats.time_to_first_audio_s is None:
                self.stats.time_to_first_audio_s = time.perf_counter() - self._submitted
            self.stats.frames += item.frames
            return item
        self._done = True
        self._admission.settle(False)
        if item[0] == "end":
            _, stats, codes, figures = item
            for key, value in stats.items():
                setattr(self.stats, key, value)
            self.stats.replica = figures["replica"]
            self._codes = codes
            self.backend.heard(figures, self.sid)
            raise StopAsyncIteration
        self.stats.stop_reason = "error"
        raise error_from_item(item)

    async def _next_item(self) -> Any:
        assert self._call is not None
        try:
            return await self._call.__anext__()
        except StopAsyncIteration:
            self._done = True
            self._admission.settle(False)
            raise RuntimeError("the engine replica ended the stream without its end") from None
        except (asyncio.CancelledError, RequestCancelledError):
            self.cancel()
            raise
        except Exception as exc:
            self._done = True
            self._admission.settle(False)
            self.stats.stop_reason = "error"
            raise transport_error(exc) from exc

    def cancel(self) -> None:
        """Stop the request: Serve cancels the replica's call (a CancelledError in its generator)."""
        self._admission.settle(False)
        if self._cancelled or self._done:
            return
        self._cancelled = True
        self.stats.stop_reason = "cancelled"
        if self._call is not None:
            self._call.cancel()

    close = cancel

    async def aclose(self) -> None:
        self.cancel()

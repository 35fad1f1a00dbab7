"""The engine replica of the Ray Serve app: one :class:`MisoEngine` and the sessions pinned to it.

One replica per GPU (``num_gpus=1``), so Serve's autoscaler adds or removes whole engines. Each
session the replica serves is registered with ``@serve.multiplexed``, so Serve (and the
SessionAffinityRouter, router.py) knows where it lives, and Serve's LRU of ``max_sessions`` forgets
the oldest. Answers are plain data: audio chunks, an end item, or an error item (transport.py).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from misotts_agents.errors import MisoError
from misotts_agents.server.protocol import Limits, ProtocolError
from misotts_agents.server.ray.router import SessionAffinityRouter
from misotts_agents.server.ray.transport import ADMITTED, error_item
from misotts_agents.server.schema import Session, SessionOp, Start
from misotts_agents.server.voices import named_voices

if TYPE_CHECKING:
    from misotts_agents.engine.prefill import PrefillChunk
    from misotts_agents.model.config import WeightFormat

log = logging.getLogger(__name__)

ENGINE_DEPLOYMENT = "MisoEngineReplica"


class _SessionLease:
    """What Ray Serve's multiplexer keeps for a session on this replica.

    When Serve's LRU evicts it (more than ``max_sessions`` on the replica) Serve awaits the
    object's ``__del__`` (an instance attribute here, so the garbage collector never calls it), and
    the session (voice, turns) is forgotten with it.
    """

    def __init__(self, sid: str, sessions: Any) -> None:
        self.sid = sid

        async def release() -> None:
            sessions.close(sid)

        self.__del__ = release


@serve.deployment(
    name=ENGINE_DEPLOYMENT,
    ray_actor_options={"num_gpus": 1},
    max_ongoing_requests=24,  # the builder sets max_batch + max_queue
    # Ray annotates RequestRouterConfig's keyword arguments as `**kwargs: dict[str, Any]` (each one a dict).
    request_router_config=RequestRouterConfig(request_router_class=SessionAffinityRouter),  # pyright: ignore[reportArgumentType]
    graceful_shutdown_timeout_s=60,  # let running utterances finish when a replica is scaled down
)
class EngineReplica:
    """One engine and the sessions pinned to it (one replica per GPU).

    ``model``: a local directory (present on every node) or a Hub repo id. ``voices``: ``NAME=CLIP``
    specs as ``misotts-agents serve --voice`` takes them (the files on every node). ``max_sessions``:
    sessions kept per replica (Serve's multiplexing LRU; the oldest is forgotten first).
    ``torch_threads``: intra-op threads (set 1 for CPU replicas sharing cores).
    """

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        watermark: bool = True,
        max_batch: int = 8,
        max_queue: int = 16,
        limits: Limits | None = None,
        voices: tuple[str, ...] | list[str] = (),
        max_sessions: int = 256,
        session_ttl_s: float = 1800.0,
        torch_threads: int | None = None,
        prefill_chunk: PrefillChunk = "auto",
        weights: WeightFormat = "bf16",
    ) -> None:
        import torch

        from misotts_agents.engine.miso_engine import MisoEngine
        from misotts_agents.server.sessions import EngineBackend, SessionStore

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.replica = serve.get_replica_context().replica_id.unique_id
        if device is None:  # the GPU Ray gave this replica (Ray leaves other devices visible to CPU replicas)
            device = "cuda" if ray.get_runtime_context().get_accelerator_ids().get("GPU") else "cpu"
        named = named_voices(list(voices))
        self.engine = MisoEngine.load(
            model,
            device=device,
            watermark=watermark,
            max_batch=max_batch,
            max_queue=max_queue,
            prefill_chunk=prefill_chunk,
            progress=False,
            weights=weights,
        )
        # The store's own LRU is wider than Serve's, so Serve's eviction (which also updates routing)
        # is the one that normally forgets a session; the store's TTL forgets idle ones.
        sessions = SessionStore(max_sessions=max_sessions + 16, ttl_s=session_ttl_s)
        self.backend = EngineBackend(self.engine, limits or Limits(), named, sessions)

        async def lease(sid: str) -> _SessionLease:
            return _SessionLease(sid, sessions)

        self._lease = serve.multiplexed(max_num_models_per_replica=max_sessions)(lease)
        log.info("engine replica %s ready: %s, max_batch=%d", self.replica, model, max_batch)

    async def start(self, start: Start, client: str | None = None, tenant: str | None = None):
        """Run one validated ``start``: yields ADMITTED once the engine gives it a slot, its
        AudioChunks, then ``("end", stats, codes, figures)``, or an error item. Cancelling the call
        (the client cancelled or went away) raises CancelledError in here, and the ``finally`` frees
        the engine slot at once. ``client`` (the ingress connection) and ``tenant`` are the keys the
        engine shares its preparation and slots fairly by."""
        stream = None
        try:
            await self._use(start.session)
            stream = self.backend.start(start, client=client, tenant=tenant)
            if await stream.wait_admitted():
                yield ADMITTED
            async for chunk in stream:
                yield chunk
            codes = stream.codes.tolist() if start.codes else None
            yield ("end", dataclasses.asdict(stream.stats), codes, self.figures())
        except Exception as exc:
            if not isinstance(exc, (ProtocolError, MisoError)):
                log.exception("start failed on replica %s", self.replica)
            yield error_item(exc)
        finally:
            if stream is not None:
                stream.cancel()

    async def session(self, msg: Session) -> dict[str, Any]:
        """Apply a validated ``session`` message; the reply names this replica."""
        try:
            if msg.op is not SessionOp.CLOSE:
                await self._use(msg.session)
            reply = await self.backend.session(msg)
            return {"reply": {**reply, "replica": self.replica}, "figures": self.figures()}
        except Exception as exc:
            if not isinstance(exc, (ProtocolError, MisoError)):
                log.exception("session failed on replica %s", self.replica)
            return {"error": error_item(exc)}

    async def _use(self, sid: str | None) -> None:
        """Register session ``sid`` here with Serve (so calls from any caller find it) and refresh its
        place in the LRU. Not the app's private one-request sessions (``~...``, made for incremental
        text and closed with it): its router keeps them on this replica, and in the LRU they would
        push out real conversations."""
        if sid is not None and not sid.startswith("~"):
            # serve.multiplexed has no return annotation: pyright infers a coroutine, not the wrapper it returns.
            await self._lease(sid)  # pyright: ignore[reportCallIssue]

    async def stats(self, sessions: list[str] | None = None) -> dict[str, Any]:
        """This replica's figures; ``holds``: which of ``sessions`` it keeps."""
        return self.figures() | {"holds": [s for s in sessions or () if s in self.backend.sessions]}

    def figures(self) -> dict[str, Any]:
        m = self.engine.metrics()
        return {
            "replica": self.replica,
            "closed": self.engine.closed,
            "max_batch": self.engine.max_batch,
            "free_slots": self.engine.free_slots,
            "sessions": len(self.backend.sessions),
            "engine": dataclasses.asdict(m),
        }

    def check_health(self) -> None:
        """Serve restarts a replica whose engine stopped."""
        if self.engine.closed:
            raise RuntimeError("the engine is closed")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

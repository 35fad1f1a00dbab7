"""The ingress of the Ray Serve app: the server's FastAPI app over a proxy of the engine replicas.

:class:`MisoIngress` serves ``create_app`` (WebSocket ``/v1/stream``, OpenAI ``/v1/audio/speech``,
``/health``, ``/metrics``) over :class:`RayEngineBackend`, which has the EngineBackend methods and
runs each call on an engine replica through a deployment handle. Clients cannot tell it from a
single server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from cachetools import LRUCache
from ray import serve
from ray.serve.handle import DeploymentHandle

from misotts_agents.engine.stats import EngineStats
from misotts_agents.server.protocol import Limits
from misotts_agents.server.ray.stream import ReplicaStream
from misotts_agents.server.ray.transport import error_from_item, transport_error
from misotts_agents.server.schema import Session, Start

log = logging.getLogger(__name__)

INGRESS_DEPLOYMENT = "MisoIngress"


class RayEngineBackend:
    """The EngineBackend interface (what ``create_app`` serves) over the engine replicas.

    ``start`` returns a stream that calls a replica when first iterated (so its errors, bad input
    included, come from the first ``__anext__``); ``session`` awaits one call. Each call goes to the
    replica holding its session (see SessionAffinityRouter). The figures (``max_batch``,
    ``free_slots``, ``metrics()``) add up the replicas heard from in the last minute: each reply
    carries its replica's figures, and they are polled when older than ``refresh_s``.
    """

    FORGET_S = 60.0

    def __init__(
        self,
        engine: DeploymentHandle,
        *,
        max_batch: int = 8,
        voice_names: tuple[str, ...] | list[str] = (),
        refresh_s: float = 5.0,
        max_tracked_sessions: int = 100_000,
    ) -> None:
        self.handle = engine
        self.voices = dict.fromkeys(voice_names)  # names only: the prompts live on the replicas
        self.replica_max_batch = max_batch
        self.refresh_s = refresh_s
        self.moved_sessions = 0
        self._figures: dict[str, dict[str, Any]] = {}
        self._homes: LRUCache[str, str] = LRUCache(max_tracked_sessions)  # session -> replica last seen serving it
        self._polled = 0.0
        self._poll: asyncio.Task[None] | None = None
        self._closed = False

    # -- calls ----------------------------------------------------------------------------------

    def call(self, sid: str | None, stream: bool = False) -> DeploymentHandle:
        """The engine handle for a call of session ``sid`` (routed to its replica)."""
        return self.handle.options(multiplexed_model_id=sid or "", stream=stream)

    def start(self, start: Start, client: Any = None, tenant: str | None = None) -> ReplicaStream:
        """A validated ``start`` (as EngineBackend.start takes it), run on the replica of its session
        when first iterated; ``client`` travels as a key (its id), the tenant by name."""
        return ReplicaStream(self, start, None if client is None else f"{id(client):x}", tenant)

    async def session(self, msg: Session) -> dict[str, Any]:
        """A validated ``session`` message, applied on the replica of its session."""
        sid = msg.session
        try:
            answer = await self.call(sid).session.remote(msg)
        except Exception as exc:
            raise transport_error(exc) from exc
        if "error" in answer:
            raise error_from_item(answer["error"])
        self.heard(answer["figures"], sid)
        return answer["reply"]

    # -- figures --------------------------------------------------------------------------------

    def heard(self, figures: dict[str, Any], sid: str | None = None) -> None:
        """A replica's figures (from a reply); notes a session that moved to another replica."""
        replica = figures["replica"]
        self._figures[replica] = figures | {"heard": time.monotonic()}
        if sid is None:
            return
        before = self._homes.get(sid)
        if before is not None and before != replica:
            self.moved_sessions += 1
            log.warning(
                "session %s moved from replica %s to %s (its voice and turn memory start afresh there)",
                sid,
                before,
                replica,
            )
        self._homes[sid] = replica

    def _fresh(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        for replica in [r for r, f in self._figures.items() if now - f["heard"] > self.FORGET_S]:
            del self._figures[replica]
        if now - self._polled > self.refresh_s:
            self._start_poll()
        return [f for f in self._figures.values() if not f["closed"]]

    def _start_poll(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._poll is None or self._poll.done():
            self._polled = time.monotonic()
            self._poll = loop.create_task(self._poll_replicas())

    async def _poll_replicas(self) -> None:
        """A few stats calls (Serve spreads them over the replicas), for figures while idle."""
        calls = [self.handle.stats.remote() for _ in range(len(self._figures) + 1)]
        for call in calls:
            with contextlib.suppress(Exception):
                self.heard(await call)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def max_batch(self) -> int:
        fresh = self._fresh()
        return sum(f["max_batch"] for f in fresh) if fresh else self.replica_max_batch

    @property
    def free_slots(self) -> int:
        fresh = self._fresh()
        return sum(f["free_slots"] for f in fresh) if fresh else self.replica_max_batch

    def metrics(self) -> EngineStats | None:
        fresh = self._fresh()
        if not fresh:
            return None
        total = {k: 0 for k in fresh[0]["engine"]}
        for f in fresh:
            for k, v in f["engine"].items():
                total[k] += v
        return EngineStats(**total)

    def close(self) -> None:
        self._closed = True
        if self._poll is not None:
            self._poll.cancel()


@serve.deployment(name=INGRESS_DEPLOYMENT, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0.5})
@serve.ingress()
class MisoIngress:
    """The server's HTTP and WebSocket API, routing every request to an engine replica.

    Each WebSocket connection is one ongoing request of this deployment for its whole life, hence
    the high ``max_ongoing_requests``; it does no model work (add replicas for many connections).
    """

    def __init__(
        self,
        engine: DeploymentHandle,
        *,
        token: str | None = None,
        limits: Limits | None = None,
        model_name: str = "",
        voice_names: tuple[str, ...] | list[str] = (),
        max_batch: int = 8,
    ) -> None:
        self.backend = RayEngineBackend(engine, max_batch=max_batch, voice_names=voice_names)
        self.token = token
        self.limits = limits or Limits()
        self.model_name = model_name

    def __serve_build_asgi_app__(self) -> Any:
        """Serve calls this once the constructor ran: the app is built around this replica's proxy."""
        from misotts_agents.server.app import create_app

        return create_app(self.backend, token=self.token, limits=self.limits, model_name=self.model_name)

    def __del__(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()

"""Ray Serve deployment of the engine server: one engine replica per GPU, each conversation pinned to one replica.

``misotts-agents serve`` runs one engine in one process. To use several GPUs (on one machine or many)
this module runs the same server on Ray Serve:

* ``MisoEngineReplica``: one :class:`MisoEngine` plus its :class:`EngineBackend` (the sessions: voice
  prompt and turn memory) per replica, ``num_gpus=1`` each, so Ray places one replica per GPU and
  Serve's autoscaler adds or removes whole engines. ``max_ongoing_requests`` is the engine's batch
  plus its queue: a full replica makes Serve hold further requests back (in the caller's queue, up to
  ``max_queued_requests``, then "busy") instead of letting the engine refuse them.
* ``MisoIngress``: the FastAPI app of ``misotts-agents serve`` (``create_app``: WebSocket
  ``/v1/stream``, OpenAI ``/v1/audio/speech``, ``/health``, ``/metrics``) over a proxy,
  :class:`RayEngineBackend`, that has the EngineBackend methods and runs each call on an engine
  replica through a deployment handle (streaming calls for ``start``). Clients cannot tell it from a
  single server: ``RemoteEngine``, the Pipecat and LiveKit services work unchanged.

Session affinity. A session's state lives on one replica (the turn memory is the audio the engine
generated there; the voice prompt's encoding is in that engine's voice cache), so every call of a
session must reach the same replica. Calls carry the session id as Serve's *multiplexed model id*:
the replica registers the session with ``@serve.multiplexed`` (Serve then knows which replica holds
which session and the LRU of ``max_sessions`` per replica forgets the oldest), and the engine
deployment routes with :class:`~.ray_router.SessionAffinityRouter` (ray_router.py), a Serve request router (Serve's
``RequestRouterConfig`` extension point) that sends a session's calls to the replica holding it.
Serve's stock power-of-two router cannot be used for this: it learns which replica holds an id only
after the replica reports it to the controller (about 0.1 to 0.5 s later), so a conversation's
second call, a few milliseconds after its first, lands on either replica; and with its FIFO
matching, a replica found for one request may be handed to another session's request. Calls
without a session go to the less loaded of two random replicas (power of two choices).

See docs/ray-serve.md for running it (``serve run``, a config file with autoscaling, several
machines) and for what happens when a replica dies or a session is evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

import numpy as np
import ray
from cachetools import LRUCache
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle

from misotts_agents.engine.request import AudioChunk, StreamStats
from misotts_agents.engine.scheduler import EngineStats
from misotts_agents.errors import EngineBusy, MisoError, from_wire, to_wire
from misotts_agents.model.sources import DEFAULT_MODEL
from misotts_agents.server import protocol
from misotts_agents.server.protocol import Limits, ProtocolError
from misotts_agents.server.ray.router import SessionAffinityRouter

log = logging.getLogger(__name__)

ENGINE_DEPLOYMENT = "MisoEngineReplica"
INGRESS_DEPLOYMENT = "MisoIngress"
APP_NAME = "misotts"


class ReplicaLost(EngineBusy):
    """The engine replica serving a request or session went away (it died or was stopped mid-call).

    A subclass of EngineBusy (protocol code ``busy``): retrying is right, and the retry runs on a live
    replica, but a session that lived on the lost replica starts there afresh (no voice, no turns).
    """


# -- errors across the process boundary -----------------------------------------------------------


def _error_item(exc: BaseException) -> tuple[str, str, str]:
    """An error as plain data (replicas answer with these rather than raise: Ray would wrap them)."""
    code, message, _ = to_wire(exc)
    return ("error", code, message)


def _exception(item: tuple[Any, ...]) -> MisoError:
    _, code, message = item
    return from_wire(code, message)


def _transport_error(exc: BaseException) -> BaseException:
    """What a failed handle call means for the client."""
    if isinstance(exc, BackPressureError):
        return EngineBusy(f"all engine replicas are busy and the queue for them is full; retry later ({exc})")
    if isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError)):
        return ReplicaLost(f"the engine replica serving this request was lost; retry ({type(exc).__name__})")
    return exc


# -- the engine replica ---------------------------------------------------------------------------


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
    request_router_config=RequestRouterConfig(request_router_class=SessionAffinityRouter),
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
    ) -> None:
        import torch

        from misotts_agents.engine.facade import MisoEngine
        from misotts_agents.server.sessions import EngineBackend, SessionStore

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.replica = serve.get_replica_context().replica_id.unique_id
        if device is None:  # the GPU Ray gave this replica (Ray leaves other devices visible to CPU replicas)
            device = "cuda" if ray.get_runtime_context().get_accelerator_ids().get("GPU") else "cpu"
        named = _named_voices(list(voices))
        self.engine = MisoEngine.load(
            model, device=device, watermark=watermark, max_batch=max_batch, max_queue=max_queue, progress=False
        )
        # The store's own LRU is wider than Serve's, so Serve's eviction (which also updates routing)
        # is the one that normally forgets a session; the store's TTL forgets idle ones.
        sessions = SessionStore(max_sessions=max_sessions + 16, ttl_s=session_ttl_s)
        self.backend = EngineBackend(self.engine, limits or Limits(), named, sessions)

        async def lease(sid: str) -> _SessionLease:
            return _SessionLease(sid, sessions)

        self._lease = serve.multiplexed(max_num_models_per_replica=max_sessions)(lease)
        log.info("engine replica %s ready: %s, max_batch=%d", self.replica, model, max_batch)

    async def start(self, msg: dict[str, Any]):
        """Run one ``start`` message: yields AudioChunks, then ``("end", stats, codes, figures)``,
        or an error item. Cancelling the call (the client cancelled or went away) raises
        CancelledError in here, and the ``finally`` frees the engine slot at once."""
        stream = None
        try:
            await self._use(protocol.session_id(msg))
            stream = self.backend.start(msg)
            async for chunk in stream:
                yield chunk
            codes = stream.codes.tolist() if msg.get("codes") else None
            yield ("end", dataclasses.asdict(stream.stats), codes, self.figures())
        except Exception as exc:
            if not isinstance(exc, (ProtocolError, MisoError)):
                log.exception("start failed on replica %s", self.replica)
            yield _error_item(exc)
        finally:
            if stream is not None:
                stream.cancel()

    async def session(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Apply a ``session`` message; the reply names this replica."""
        try:
            if msg.get("op") != "close":
                await self._use(protocol.session_id(msg))
            reply = await self.backend.session(msg)
            return {"reply": {**reply, "replica": self.replica}, "figures": self.figures()}
        except Exception as exc:
            if not isinstance(exc, (ProtocolError, MisoError)):
                log.exception("session failed on replica %s", self.replica)
            return {"error": _error_item(exc)}

    async def _use(self, sid: str | None) -> None:
        """Register session ``sid`` here with Serve (so calls from any caller find it) and refresh its
        place in the LRU. Not the app's private one-request sessions (``~...``, made for incremental
        text and closed with it): its router keeps them on this replica, and in the LRU they would
        push out real conversations."""
        if sid is not None and not sid.startswith("~"):
            await self._lease(sid)

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


def _named_voices(specs: list[str]) -> dict[str, Any]:
    if not specs:
        return {}
    from misotts_agents.tools.cli import named_voices

    try:
        return named_voices(specs)
    except SystemExit as exc:  # the CLI's way to report a bad spec; a replica raises instead
        raise ValueError(str(exc)) from None


# -- the ingress ------------------------------------------------------------------------------------


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

    def start(self, msg: dict[str, Any]) -> ReplicaStream:
        sid = protocol.session_id(msg)  # a malformed session id is refused at once
        return ReplicaStream(self, msg, sid)

    async def session(self, msg: dict[str, Any]) -> dict[str, Any]:
        sid = protocol.session_id(msg)
        if sid is None:
            raise ProtocolError("bad_message", "a session message needs 'session' (the conversation's id)")
        try:
            answer = await self.call(sid).session.remote(msg)
        except Exception as exc:
            raise _transport_error(exc) from exc
        if "error" in answer:
            raise _exception(answer["error"])
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


@dataclasses.dataclass
class ReplicaStreamStats(StreamStats):
    """StreamStats plus the replica that generated the audio."""

    replica: str | None = None


class ReplicaStream:
    """One ``start`` run on an engine replica, shaped like the engine's stream: ``async for`` its
    AudioChunks; ``stats`` and ``codes`` once it ended; ``cancel()`` cancels the replica's call,
    which stops the engine request and frees its slot there."""

    def __init__(self, backend: RayEngineBackend, msg: dict[str, Any], sid: str | None) -> None:
        self.backend = backend
        self.msg = msg
        self.sid = sid
        seed = msg.get("seed")
        self.stats = ReplicaStreamStats(seed=seed if isinstance(seed, int) else 0)
        self._codes: list[list[int]] | None = None
        self._call: Any = None
        self._submitted = 0.0
        self._done = False
        self._cancelled = False

    @property
    def replica(self) -> str | None:
        return self.stats.replica

    @property
    def codes(self) -> np.ndarray:
        return protocol.codes_array(self._codes)

    def __aiter__(self) -> ReplicaStream:
        return self

    async def __anext__(self) -> AudioChunk:
        if self._done or self._cancelled:
            raise StopAsyncIteration
        if self._call is None:
            self._submitted = time.perf_counter()
            self._call = self.backend.call(self.sid, stream=True).start.remote(self.msg)
        try:
            item = await self._call.__anext__()
        except StopAsyncIteration:
            self._done = True
            raise RuntimeError("the engine replica ended the stream without its end") from None
        except (asyncio.CancelledError, RequestCancelledError):
            self.cancel()
            raise
        except Exception as exc:
            self._done = True
            self.stats.stop_reason = "error"
            raise _transport_error(exc) from exc
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
            self.backend.heard(figures, self.sid)
            raise StopAsyncIteration
        self.stats.stop_reason = "error"
        raise _exception(item)

    def cancel(self) -> None:
        """Stop the request: Serve cancels the replica's call (a CancelledError in its generator)."""
        if self._cancelled or self._done:
            return
        self._cancelled = True
        self.stats.stop_reason = "cancelled"
        if self._call is not None:
            self._call.cancel()

    close = cancel

    async def aclose(self) -> None:
        self.cancel()


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


# -- building the application ------------------------------------------------------------------------


class RayServeArgs(BaseModel):
    """The application's arguments (``serve run ...:app_builder key=value`` or a config's ``args``).

    Replica counts, autoscaling and resources can also be set per deployment in a Serve config file
    (``deployments:``); those settings win over these.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="local model directory (on every node) or Hub repo id")
    device: str | None = Field(None, description="engine device; default: cuda when Ray gave the replica a GPU")
    watermark: bool = True
    max_batch: int = Field(8, ge=1, description="requests generated at once per replica")
    max_queue: int = Field(16, ge=0, description="requests waiting inside each replica's engine")
    num_gpus: float = Field(1, ge=0, description="GPUs per engine replica (0: CPU replicas, for tests)")
    num_cpus: float = Field(1, ge=0, description="CPUs per engine replica")
    num_replicas: int | None = Field(None, ge=1, description="fixed engine replica count (no autoscaling)")
    autoscaling_config: dict[str, Any] | None = Field(None, description="Serve autoscaling for the engines")
    max_queued_requests: int = Field(
        64, description="requests each ingress replica holds back while the engine replicas are full (-1: no limit)"
    )
    max_sessions: int = Field(256, ge=1, description="sessions kept per engine replica (LRU)")
    session_ttl_s: float = Field(1800.0, gt=0, description="forget sessions idle this long")
    voices: list[str] = Field(default_factory=list, description="named voices, NAME=CLIP (comma-separated)")
    token: str | None = Field(None, description="require 'Authorization: Bearer TOKEN' (needed off loopback)")
    max_text: int = Field(4000, ge=1)
    max_per_connection: int = Field(8, ge=1)
    ingress_replicas: int = Field(1, ge=1)
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per engine replica")

    @field_validator("voices", mode="before")
    @classmethod
    def _split_voices(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value


def build_app(args: RayServeArgs | dict[str, Any]) -> Application:
    """The Serve application: the ingress bound to the engine replicas."""
    a = args if isinstance(args, RayServeArgs) else RayServeArgs.model_validate(args)
    limits = Limits(max_text_chars=a.max_text, max_concurrent_per_connection=a.max_per_connection)
    engine_options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": a.num_gpus, "num_cpus": a.num_cpus},
        # A replica takes what its engine can hold (batch + queue); Serve keeps the rest back, so
        # the engine itself never has to refuse a request.
        "max_ongoing_requests": a.max_batch + a.max_queue,
        "max_queued_requests": a.max_queued_requests,
    }
    if a.autoscaling_config is not None:
        engine_options["autoscaling_config"] = a.autoscaling_config
    elif a.num_replicas is not None:
        engine_options["num_replicas"] = a.num_replicas
    engine = EngineReplica.options(**engine_options).bind(
        a.model,
        device=a.device,
        watermark=a.watermark,
        max_batch=a.max_batch,
        max_queue=a.max_queue,
        limits=limits,
        voices=tuple(a.voices),
        max_sessions=a.max_sessions,
        session_ttl_s=a.session_ttl_s,
        torch_threads=a.torch_threads,
    )
    names = tuple(spec.partition("=")[0] for spec in a.voices)
    return MisoIngress.options(num_replicas=a.ingress_replicas).bind(
        engine, token=a.token, limits=limits, model_name=a.model, voice_names=names, max_batch=a.max_batch
    )


def app_builder(args: dict[str, Any]) -> Application:
    """For ``serve run misotts_agents.server.ray.serve:app_builder model=... num_gpus=1`` and config files."""
    return build_app(RayServeArgs.model_validate(args))

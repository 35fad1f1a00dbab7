"""Ray Serve deployment of the engine server: one engine replica per GPU, each conversation pinned to one replica.

``misotts-agents serve`` runs one engine in one process. To use several GPUs (on one machine or many)
this package runs the same server on Ray Serve; this module builds the application
(``app_builder``, the import path for ``serve run`` and config files) from its deployments:

* ``MisoEngineReplica`` (replica.py): one :class:`MisoEngine` plus its :class:`EngineBackend` (the sessions: voice
  prompt and turn memory) per replica, ``num_gpus=1`` each, so Ray places one replica per GPU and
  Serve's autoscaler adds or removes whole engines. ``max_ongoing_requests`` is the engine's batch
  plus its queue: a full replica makes Serve hold further requests back (in the caller's queue, up to
  ``max_queued_requests``, then "busy") instead of letting the engine refuse them.
* ``MisoIngress`` (ingress.py): the FastAPI app of ``misotts-agents serve`` (``create_app``: WebSocket
  ``/v1/stream``, OpenAI ``/v1/audio/speech``, ``/health``, ``/metrics``) over a proxy,
  :class:`RayEngineBackend`, that has the EngineBackend methods and runs each call on an engine
  replica through a deployment handle (streaming calls for ``start``, read by ``ReplicaStream``,
  stream.py). Clients cannot tell it from a single server: ``RemoteEngine``, the Pipecat and LiveKit
  services work unchanged. Errors cross between them as data (transport.py).

Session affinity. A session's state lives on one replica (the turn memory is the audio the engine
generated there; the voice prompt's encoding is in that engine's voice cache), so every call of a
session must reach the same replica. Calls carry the session id as Serve's *multiplexed model id*:
the replica registers the session with ``@serve.multiplexed`` (Serve then knows which replica holds
which session and the LRU of ``max_sessions`` per replica forgets the oldest), and the engine
deployment routes with :class:`~.router.SessionAffinityRouter` (router.py), a Serve request router
(Serve's ``RequestRouterConfig`` extension point) that sends a session's calls to the replica holding it.
Serve's stock power-of-two router cannot be used for this: it learns which replica holds an id only
after the replica reports it to the controller (about 0.1 to 0.5 s later), so a conversation's
second call, a few milliseconds after its first, lands on either replica; and with its FIFO
matching, a replica found for one request may be handed to another session's request. Calls
without a session go to the less loaded of two random replicas (power of two choices).

See docs/ray-serve.md for running it (``serve run``, a config file with autoscaling, several
machines) and for what happens when a replica dies or a session is evicted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray.serve.deployment import Application

from misotts_agents.model.config import WeightFormat
from misotts_agents.model.sources import DEFAULT_MODEL
from misotts_agents.server.protocol import Limits
from misotts_agents.server.ray.ingress import INGRESS_DEPLOYMENT, MisoIngress
from misotts_agents.server.ray.replica import ENGINE_DEPLOYMENT, EngineReplica

__all__ = ["APP_NAME", "ENGINE_DEPLOYMENT", "INGRESS_DEPLOYMENT", "RayServeArgs", "app_builder", "build_app"]

APP_NAME = "misotts"


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
    weights: WeightFormat = Field(
        "bf16", description="linear layers: bf16 (the model's dtype), int8, or fp8 (CUDA >= 8.9); model/quantized.py"
    )
    prefill_chunk: int | Literal["auto"] | None = Field(
        "auto", description="prefill budget per pass: 'auto', positions, or 0 for whole prompts (engine/prefill.py)"
    )

    @field_validator("prefill_chunk", mode="before")
    @classmethod
    def _parse_prefill_chunk(cls, value: Any) -> Any:
        from misotts_agents.engine.prefill import parse_prefill_chunk  # (torch: not at import)

        try:
            return parse_prefill_chunk(value)
        except ValueError as exc:  # pydantic reports it as this field's validation error
            raise ValueError(str(exc)) from None

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
        prefill_chunk=a.prefill_chunk,
        weights=a.weights,
    )
    names = tuple(spec.partition("=")[0] for spec in a.voices)
    return MisoIngress.options(num_replicas=a.ingress_replicas).bind(
        engine, token=a.token, limits=limits, model_name=a.model, voice_names=names, max_batch=a.max_batch
    )


def app_builder(args: dict[str, Any]) -> Application:
    """For ``serve run misotts_agents.server.ray.serve:app_builder model=... num_gpus=1`` and config files."""
    return build_app(RayServeArgs.model_validate(args))

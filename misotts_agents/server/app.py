"""The engine server: one shared MisoEngine behind a WebSocket stream (connection.py, protocol.py), an
OpenAI-compatible speech endpoint (speech.py), ``/health`` and Prometheus ``/metrics``.

Facing the world (README "Exposing the server"): bearer tokens name tenants (tenants.py) whose
sessions, audio ids and voices are their own; everything clients send is checked by one schema
(schema.py) and refused with a clear 4xx / ``error`` message, never a 500; every buffer is bounded
(:class:`~misotts_agents.server.protocol.Limits`; state kept between requests by one memory budget,
budget.py); a browser page may use the server only from an allowed origin (no CORS by default, and
POST bodies must be ``application/json``, which a page cannot send cross-origin without CORS); and
a stop drains running streams first (lifecycle.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.server.budget import MemoryBudget
from misotts_agents.server.connection import TRANSPORT_KEY, Connection
from misotts_agents.server.lifecycle import Lifecycle
from misotts_agents.server.protocol import Limits, ProtocolError
from misotts_agents.server.sessions import EngineBackend
from misotts_agents.server.speech import add_speech_route, openai_error, unauthorized
from misotts_agents.server.tenants import DEFAULT_TENANT, Quotas, Tenants

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class Metrics:
    """Prometheus figures of one server (own registry, so several apps can live in one process)."""

    def __init__(self, backend: Any, budget: MemoryBudget, quotas: Quotas) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active = Gauge("misotts_active_streams", "requests being streamed to clients", registry=r)
        queue = Gauge("misotts_queue_depth", "engine requests waiting for a batch slot", registry=r)
        queue.set_function(lambda: _safe(lambda: backend.metrics().queued))
        busy = Gauge("misotts_engine_active", "engine requests generating now", registry=r)
        busy.set_function(lambda: _safe(lambda: backend.metrics().active))
        slots = Gauge("misotts_engine_free_slots", "free engine batch slots", registry=r)
        slots.set_function(lambda: _safe(lambda: backend.free_slots))
        self.connections = Gauge("misotts_websocket_connections", "open /v1/stream connections", registry=r)
        memory = Gauge("misotts_state_bytes", "sessions and cached audio kept, all tenants", registry=r)
        memory.set_function(lambda: budget.used_bytes)
        sessions = Gauge("misotts_sessions", "sessions kept, all tenants", registry=r)
        sessions.set_function(lambda: budget.sessions)
        self.refused = Counter("misotts_refused", "client input refused, by error code", ["code"], registry=r)
        self.ttfa = Histogram(
            "misotts_time_to_first_audio_seconds",
            "submission to the first audio chunk",
            buckets=(0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
            registry=r,
        )
        self.rtf = Histogram(
            "misotts_real_time_factor",
            "wall seconds per second of audio, per finished request",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5, 10),
            registry=r,
        )
        self.requests = Counter(
            "misotts_requests", "requests by endpoint and outcome", ["endpoint", "outcome"], registry=r
        )
        self.audio_seconds = Counter("misotts_audio_seconds", "seconds of audio streamed", registry=r)

    def finished(self, endpoint: str, outcome: str, stats: Any = None) -> None:
        self.requests.labels(endpoint, outcome).inc()
        if stats is not None:
            if stats.time_to_first_audio_s is not None:
                self.ttfa.observe(stats.time_to_first_audio_s)
            if outcome == "completed" and stats.real_time_factor is not None:
                self.rtf.observe(stats.real_time_factor)


def _safe(fn: Any) -> float:
    try:
        return float(fn())
    except Exception:
        return float("nan")


def public_model_name(model: str) -> str:
    """What ``/health`` may say about the model: a Hub repo id as it is, a local path by its last
    part only (never where the files are)."""
    if HUB_ID.fullmatch(model) and not Path(model).exists():
        return model
    return Path(model).name


class Origins:
    """Which browser origins may use the server: none but its own, unless allowed (``*``: any)."""

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self.allowed = {o.rstrip("/").lower() for o in allowed}

    def allows(self, headers: Any) -> bool:
        origin = headers.get("origin")
        if origin is None:  # not a browser page (browsers always send it on WebSockets and CORS requests)
            return True
        origin = origin.rstrip("/").lower()
        if "*" in self.allowed or origin in self.allowed:
            return True
        return urlsplit(origin).netloc == (headers.get("host") or "").lower()  # the server's own page


@dataclass(frozen=True)
class ServerState:
    """What one app's routes share: the backend, who may use it, its limits and counters, and the
    drain's bookkeeping."""

    backend: Any  # an EngineBackend, or a proxy with its methods (the Ray Serve ingress)
    tenants: Tenants
    limits: Limits
    budget: MemoryBudget
    quotas: Quotas
    lifecycle: Lifecycle
    origins: Origins
    metrics: Metrics
    model: str  # what /health says about the model (public_model_name)


def create_app(
    engine: Any,
    *,
    token: str | None = None,
    tenants: Tenants | None = None,
    limits: Limits | None = None,
    model_name: str = "",
    voices: dict[str, VoicePrompt] | None = None,
    allow_origins: Iterable[str] = (),
) -> FastAPI:
    """The FastAPI app serving ``engine``: a :class:`MisoEngine` (the caller owns and closes it),
    or a backend (an :class:`EngineBackend` or a proxy with its methods, as the Ray Serve ingress).

    ``tenants`` (or ``token``: one tenant, ``default``) say who may use it; neither: anyone who can
    connect. ``voices`` are the named voices of a MisoEngine's backend (``tenant/name`` keys are
    that tenant's only). ``allow_origins``: browser origins allowed besides the server's own (CORS
    is enabled for them; ``*`` allows every origin)."""
    limits = limits or Limits()
    if tenants is not None and token:
        raise ValueError("give tenants or one token, not both")
    backend = _backend_for(engine, limits, voices)
    budget = getattr(backend, "budget", None) or MemoryBudget.for_limits(limits)
    quotas = Quotas(limits)
    server = ServerState(
        backend=backend,
        tenants=tenants or Tenants({DEFAULT_TENANT: token} if token else None),
        limits=limits,
        budget=budget,
        quotas=quotas,
        lifecycle=Lifecycle(),
        origins=Origins(allow_origins),
        metrics=Metrics(backend, budget, quotas),
        model=public_model_name(model_name) if model_name else "",
    )
    app = FastAPI(title="misotts-agents", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend
    app.state.metrics = server.metrics
    app.state.limits = limits
    app.state.budget = budget
    app.state.quotas = quotas
    app.state.lifecycle = server.lifecycle
    app.add_middleware(_RecordTransport)
    if server.origins.allowed:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=sorted(server.origins.allowed),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    _add_error_handlers(app)
    _add_status_routes(app, server)
    add_speech_route(app, server)  # speech.py
    _add_stream_route(app, server)
    return app


def _backend_for(engine: Any, limits: Limits, voices: dict[str, VoicePrompt] | None) -> Any:
    if not hasattr(engine, "start"):
        return EngineBackend(engine, limits, voices)
    if voices:
        raise ValueError("pass named voices to the backend, not to create_app")
    return engine


def _add_error_handlers(app: FastAPI) -> None:
    """Every answer is OpenAI's error JSON, unknown routes and our own bugs included."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return openai_error(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "http_error")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return openai_error(400, "invalid request", "invalid_request")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("request %s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return openai_error(500, "internal error", "internal")


def _add_status_routes(app: FastAPI, server: ServerState) -> None:
    """``/health`` (open: load balancers probe it) and ``/metrics`` (for a token holder)."""

    @app.get("/health")
    async def health() -> JSONResponse:
        closed = server.backend.closed
        status = "closed" if closed else "draining" if server.lifecycle.draining else "ok"
        body: dict[str, Any] = {"status": status, "model": server.model, "max_batch": server.backend.max_batch}
        if not closed:
            body["free_slots"] = server.backend.free_slots
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if server.tenants.authenticate(request.headers.get("authorization")) is None:
            return unauthorized()
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _add_stream_route(app: FastAPI, server: ServerState) -> None:
    @app.websocket("/v1/stream")
    async def ws_stream(ws: WebSocket) -> None:
        await stream_connection(ws, server)


async def stream_connection(ws: WebSocket, server: ServerState) -> None:
    """One ``/v1/stream`` connection: admitted (origin, token, not draining, the tenant's quota),
    then served by a :class:`Connection` until it closes."""
    peer = f"{ws.client.host}:{ws.client.port}" if ws.client else "?"
    if not server.origins.allows(ws.headers):
        log.info("refused a WebSocket from %s: origin %r is not allowed", peer, ws.headers.get("origin"))
        await ws.close(code=1008)  # before the handshake: HTTP 403
        return
    await ws.accept()
    tenant = server.tenants.authenticate(ws.headers.get("authorization"))
    if tenant is None:
        log.info("refused a WebSocket from %s: missing or wrong bearer token", peer)
        await ws.close(code=1008, reason="missing or wrong bearer token")
        return
    if server.lifecycle.draining:
        await ws.close(code=1001, reason="server shutting down")
        return
    try:
        server.quotas.connect(tenant)
    except ProtocolError as exc:
        log.info("refused a WebSocket from %s (tenant %s): %s", peer, tenant, exc.message)
        await ws.close(code=1013, reason=exc.message[:120])
        return
    conn = Connection(
        ws, server.backend, server.limits, server.metrics, tenant, server.quotas, server.budget, server.lifecycle
    )
    server.lifecycle.connections.add(conn)
    server.metrics.connections.inc()
    try:
        await conn.run()
    finally:
        server.lifecycle.connections.discard(conn)
        server.quotas.disconnect(tenant)
        server.metrics.connections.dec()


class _RecordTransport:
    """Records a WebSocket's transport in its scope, so that a client cut off for not reading can
    be dropped without waiting for it to read (connection.py). Under uvicorn the ASGI ``send`` of a
    WebSocket is a method of its protocol object, which holds the transport; elsewhere nothing is
    recorded and the close frame is all there is."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if transport is not None:
                scope[TRANSPORT_KEY] = transport
        await self.app(scope, receive, send)

"""The engine server: one shared MisoEngine behind a WebSocket stream (connection.py, protocol.py), an
OpenAI-compatible speech endpoint, ``/health`` and Prometheus ``/metrics``.

Facing the world (README "Exposing the server"): bearer tokens name tenants (tenants.py) whose
sessions, audio ids and voices are their own; everything clients send is checked by one schema
(schema.py) and refused with a clear 4xx / ``error`` message, never a 500; every buffer is bounded
(:class:`~misotts_agents.server.protocol.Limits`; state kept between requests by one memory budget,
budget.py); a browser page may use the server only from an allowed origin (no CORS by default, and
POST bodies must be ``application/json``, which a page cannot send cross-origin without CORS); and
a stop drains running streams first (runner.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from misotts_agents.audio import SAMPLE_RATE
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.errors import EngineClosed, MisoError, http_status, to_wire
from misotts_agents.server import schema
from misotts_agents.server.budget import MemoryBudget
from misotts_agents.server.connection import TRANSPORT_KEY, Connection
from misotts_agents.server.encode import FORMATS, StreamEncoder
from misotts_agents.server.protocol import Limits, ProtocolError
from misotts_agents.server.runner import Lifecycle
from misotts_agents.server.sessions import EngineBackend
from misotts_agents.server.tenants import DEFAULT_TENANT, Quotas, Tenants, scope, scoped_voice

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
    tenants = tenants or Tenants({DEFAULT_TENANT: token} if token else None)
    if hasattr(engine, "start"):
        if voices:
            raise ValueError("pass named voices to the backend, not to create_app")
        backend = engine
    else:
        backend = EngineBackend(engine, limits, voices)
    budget = getattr(backend, "budget", None) or MemoryBudget.for_limits(limits)
    quotas = Quotas(limits)
    lifecycle = Lifecycle()
    origins = Origins(allow_origins)
    metrics = Metrics(backend, budget, quotas)
    model = public_model_name(model_name) if model_name else ""
    app = FastAPI(title="misotts-agents", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend
    app.state.metrics = metrics
    app.state.limits = limits
    app.state.budget = budget
    app.state.quotas = quotas
    app.state.lifecycle = lifecycle
    app.add_middleware(_RecordTransport)
    if origins.allowed:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=sorted(origins.allowed),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    # Every answer is OpenAI's error JSON, unknown routes and our own bugs included.
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

    def unauthorized() -> JSONResponse:
        return JSONResponse(
            {"error": {"message": "missing or wrong bearer token", "type": "authentication_error", "code": 401}},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    def refused(exc: BaseException, where: str) -> JSONResponse:
        """Bad input: one log line, no stack trace, and OpenAI's error JSON with the field at fault."""
        code, message, _ = to_wire(exc)
        metrics.refused.labels(code).inc()
        log.info("refused %s: %s: %s", where, code, message[:300])
        return openai_error(http_status(exc), message, code, getattr(exc, "param", None))

    @app.get("/health")
    async def health() -> JSONResponse:
        closed = backend.closed
        status = "closed" if closed else "draining" if lifecycle.draining else "ok"
        body: dict[str, Any] = {"status": status, "model": model, "max_batch": backend.max_batch}
        if not closed:
            body["free_slots"] = backend.free_slots
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if tenants.authenticate(request.headers.get("authorization")) is None:
            return unauthorized()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- OpenAI-compatible speech -----------------------------------------------------------

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        tenant = tenants.authenticate(request.headers.get("authorization"))
        if tenant is None:
            return unauthorized()
        peer = f"{request.client.host}" if request.client else "?"
        if not origins.allows(request.headers):
            log.info("refused %s: origin %r is not allowed", peer, request.headers.get("origin"))
            return openai_error(403, "requests from this origin are not allowed", "forbidden_origin")
        if lifecycle.draining:
            return refused(EngineClosed("the server is shutting down"), peer)
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            return openai_error(415, "send the body as JSON, with 'Content-Type: application/json'", "invalid_request")
        try:
            raw = await read_body(request, limits)
        except ProtocolError as exc:
            status = 413 if exc.code == "too_large" else 408
            log.info("refused %s: %s", peer, exc.message)
            return openai_error(status, exc.message, exc.code, headers={"Connection": "close"})
        try:
            speech = schema.parse_speech_body(raw, limits)
            start = speech.start(getattr(backend, "voices", None))
            if speech.session is not None:
                start["session"] = scope(tenant, speech.session)
            if "voice" in start:
                start["voice"] = scoped_voice(getattr(backend, "voices", None), tenant, start["voice"])
            quotas.start_stream(tenant)
        except (ProtocolError, MisoError) as exc:
            metrics.finished("openai", "rejected")
            return refused(exc, peer)
        try:
            stream = backend.start(start, client=f"http:{tenant}:{peer}")
        except (ProtocolError, MisoError) as exc:
            quotas.end_stream(tenant)
            metrics.finished("openai", "rejected")
            return refused(exc, peer)
        lifecycle.http_streams.add(stream)
        metrics.active.inc()
        outcome = ["cancelled"]

        def done() -> None:  # once, however the response ends (even before its body starts)
            if stream in lifecycle.http_streams:
                lifecycle.http_streams.discard(stream)
                stream.cancel()
                quotas.end_stream(tenant)
                metrics.active.dec()
                metrics.finished("openai", outcome[0], stream.stats)

        try:
            first = await stream.__anext__()  # errors from preparation still get a status code
        except StopAsyncIteration:
            first = None
        except (ProtocolError, MisoError) as exc:  # a backend may refuse here rather than in start() (Ray)
            outcome[0] = "error"
            done()
            return refused(exc, peer)
        except BaseException:
            outcome[0] = "error"
            done()
            raise

        async def body() -> AsyncIterator[bytes]:
            encoder = None
            try:
                encoder = StreamEncoder(speech.response_format)  # each chunk encoded as it comes (encode.py)
                if first is not None:
                    yield encoder.encode(first.pcm)
                    metrics.audio_seconds.inc(first.duration_s)
                    async for chunk in stream:
                        yield encoder.encode(chunk.pcm)
                        metrics.audio_seconds.inc(chunk.duration_s)
                yield encoder.finish()
                outcome[0] = "completed"
            except MisoError as exc:  # the status line is out: the body ends short
                outcome[0] = "error"
                log.warning("speech request failed mid-stream: %s", exc)
            finally:
                if encoder is not None:
                    encoder.close()

        media = FORMATS[speech.response_format].content_type
        return _Streamed(done, body(), media_type=media, headers={"X-Sample-Rate": str(SAMPLE_RATE)})

    # -- WebSocket stream -------------------------------------------------------------------

    @app.websocket("/v1/stream")
    async def ws_stream(ws: WebSocket) -> None:
        peer = f"{ws.client.host}:{ws.client.port}" if ws.client else "?"
        if not origins.allows(ws.headers):
            log.info("refused a WebSocket from %s: origin %r is not allowed", peer, ws.headers.get("origin"))
            await ws.close(code=1008)  # before the handshake: HTTP 403
            return
        await ws.accept()
        tenant = tenants.authenticate(ws.headers.get("authorization"))
        if tenant is None:
            log.info("refused a WebSocket from %s: missing or wrong bearer token", peer)
            await ws.close(code=1008, reason="missing or wrong bearer token")
            return
        if lifecycle.draining:
            await ws.close(code=1001, reason="server shutting down")
            return
        try:
            quotas.connect(tenant)
        except ProtocolError as exc:
            log.info("refused a WebSocket from %s (tenant %s): %s", peer, tenant, exc.message)
            await ws.close(code=1013, reason=exc.message[:120])
            return
        conn = Connection(ws, backend, limits, metrics, tenant, quotas, budget, lifecycle)
        lifecycle.connections.add(conn)
        metrics.connections.inc()
        try:
            await conn.run()
        finally:
            lifecycle.connections.discard(conn)
            quotas.disconnect(tenant)
            metrics.connections.dec()

    return app


def openai_error(
    status: int, message: str, code: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    error = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request body, refused (``too_large``) as soon as it is known to be over the limit, from
    its Content-Length or while it streams in, and refused (``timeout``) if it is not all in within
    ``body_timeout_s``."""
    limit = limits.max_message_bytes
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdecimal() or int(declared) > limit):
        raise ProtocolError("too_large", f"request body too large (at most {limit} bytes)")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ProtocolError("too_large", f"request body too large (at most {limit} bytes)")
                chunks.append(chunk)
    except TimeoutError:
        raise ProtocolError("timeout", f"the body did not arrive within {limits.body_timeout_s:g} s") from None
    return b"".join(chunks)


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


class _Streamed(StreamingResponse):
    """A streamed response that runs ``done`` when it ends, however: finished, failed, or the
    client gone before the body started (a body generator that never started never runs its
    ``finally``)."""

    def __init__(self, done: Any, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._done = done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._done()

"""The OpenAI-compatible speech endpoint, ``POST /v1/audio/speech``, and OpenAI's error JSON, which
every HTTP answer of the server uses.

A request is admitted in order (token, origin, not draining, a JSON body within its size and time
limits, a valid body within the tenant's quotas), then the status line and headers go out as soon
as the engine gives it a slot (not with its first audio: a client sees at once that it is being
served); a request the engine refuses before that (queue full, or waited past the engine's bound)
gets its status: 503 ``busy`` or 429 ``too_many``, both with ``Retry-After``. After the status the
audio is encoded chunk by chunk as it comes (encode.py), and a failure can only end the body short.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from misotts_agents.audio import SAMPLE_RATE
from misotts_agents.errors import EngineClosed, MisoError, http_status, to_wire
from misotts_agents.server import schema
from misotts_agents.server.encode import FORMATS, StreamEncoder
from misotts_agents.server.protocol import Limits, ProtocolError
from misotts_agents.server.tenants import scope, scoped_voice

if TYPE_CHECKING:  # app.py builds the state and imports this module
    from misotts_agents.server.app import ServerState

log = logging.getLogger(__name__)


def add_speech_route(app: FastAPI, server: ServerState) -> None:
    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        return await speech_response(request, server)


async def speech_response(request: Request, server: ServerState) -> Response:
    """One speech request, from its headers to the streamed audio (or OpenAI's error JSON)."""
    tenant = server.tenants.authenticate(request.headers.get("authorization"))
    if tenant is None:
        return unauthorized()
    peer = f"{request.client.host}" if request.client else "?"
    refusal = _refuse_early(request, server, peer)
    if refusal is not None:
        return refusal
    try:
        raw = await read_body(request, server.limits)
    except ProtocolError as exc:
        status = 413 if exc.code == "too_large" else 408
        log.info("refused %s: %s", peer, exc.message)
        return openai_error(status, exc.message, exc.code, headers={"Connection": "close"})
    try:
        body, stream = _start(raw, tenant, peer, server)
    except (ProtocolError, MisoError) as exc:
        server.metrics.finished("openai", "rejected")
        return refused(server, exc, peer)
    return await _respond(_Tracked(stream, tenant, server), body.response_format, peer)


def _refuse_early(request: Request, server: ServerState, peer: str) -> JSONResponse | None:
    """The refusals known from the headers alone, before the body is read."""
    if not server.origins.allows(request.headers):
        log.info("refused %s: origin %r is not allowed", peer, request.headers.get("origin"))
        return openai_error(403, "requests from this origin are not allowed", "forbidden_origin")
    if server.lifecycle.draining:
        return refused(server, EngineClosed("the server is shutting down"), peer)
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        return openai_error(415, "send the body as JSON, with 'Content-Type: application/json'", "invalid_request")
    return None


def _start(raw: bytes, tenant: str, peer: str, server: ServerState) -> tuple[schema.SpeechBody, Any]:
    """The checked body and its stream, started in the tenant's scope and counted in its quotas
    (released again if the backend refuses to start it)."""
    body = schema.parse_speech_body(raw, server.limits)
    voices = getattr(server.backend, "voices", None)
    start = body.start(voices)
    update: dict[str, Any] = {}
    if start.session is not None:
        update["session"] = scope(tenant, start.session)
    if isinstance(start.voice, str):
        update["voice"] = scoped_voice(voices, tenant, start.voice)
    start = start.model_copy(update=update)
    server.quotas.start_stream(tenant)
    try:
        client = f"http:{tenant}:{peer}"
        stream = server.quotas.start_waiting(tenant, lambda: server.backend.start(start, client=client, tenant=tenant))
    except BaseException:
        server.quotas.end_stream(tenant)
        raise
    return body, stream


class _Tracked:
    """A running speech stream, counted (active streams, the tenant's quota, the drain's list)
    until :meth:`done` releases it, once, however the response ends."""

    def __init__(self, stream: Any, tenant: str, server: ServerState) -> None:
        self.stream = stream
        self.tenant = tenant
        self.server = server
        self.outcome = "cancelled"  # until the body says otherwise
        server.lifecycle.http_streams.add(stream)
        server.metrics.active.inc()

    def done(self) -> None:
        lifecycle = self.server.lifecycle
        if self.stream in lifecycle.http_streams:
            lifecycle.http_streams.discard(self.stream)
            self.stream.cancel()
            self.server.quotas.end_stream(self.tenant)
            self.server.metrics.active.dec()
            self.server.metrics.finished("openai", self.outcome, self.stream.stats)


async def _respond(tracked: _Tracked, response_format: str, peer: str) -> Response:
    """The status once the engine has given the request a slot; a refusal before that (the engine's
    queue, its wait bound, bad input found while preparing) still gets its 4xx / 5xx."""
    try:
        if not await tracked.stream.wait_admitted():
            async for _ in tracked.stream:  # raises why it ended without a slot (EngineBusy: its wait bound)
                break
            raise EngineClosed("the request ended before it got an engine slot")
    except (ProtocolError, MisoError) as exc:
        tracked.outcome = "error"
        tracked.done()
        return refused(tracked.server, exc, peer)
    except BaseException:
        tracked.outcome = "error"
        tracked.done()
        raise
    media = FORMATS[response_format].content_type
    content = _encoded(tracked, response_format)
    return _Streamed(tracked.done, content, media_type=media, headers={"X-Sample-Rate": str(SAMPLE_RATE)})


async def _encoded(tracked: _Tracked, response_format: str) -> AsyncIterator[bytes]:
    """The body: each chunk encoded as it comes (encode.py)."""
    metrics = tracked.server.metrics
    encoder = None
    try:
        encoder = StreamEncoder(response_format)
        async for chunk in tracked.stream:
            yield encoder.encode(chunk.pcm)
            metrics.audio_seconds.inc(chunk.duration_s)
        yield encoder.finish()
        tracked.outcome = "completed"
    except MisoError as exc:  # the status line is out: the body ends short
        tracked.outcome = "error"
        log.warning("speech request failed mid-stream: %s", exc)
    finally:
        if encoder is not None:
            encoder.close()


def openai_error(
    status: int, message: str, code: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    error = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def unauthorized() -> JSONResponse:
    return JSONResponse(
        {"error": {"message": "missing or wrong bearer token", "type": "authentication_error", "code": 401}},
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


def refused(server: ServerState, exc: BaseException, where: str) -> JSONResponse:
    """A refusal: one log line, no stack trace, and OpenAI's error JSON with the field at fault; a
    retryable one (busy, too_many) says when to retry (``Retry-After``)."""
    code, message, retryable = to_wire(exc)
    server.metrics.refused.labels(code).inc()
    log.info("refused %s: %s: %s", where, code, message[:300])
    status = http_status(exc)
    headers = {"Retry-After": str(server.limits.retry_after_s)} if retryable and status in (429, 503) else None
    return openai_error(status, message, code, getattr(exc, "param", None), headers=headers)


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

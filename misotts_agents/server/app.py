"""The engine server: one shared MisoEngine behind a WebSocket stream, an OpenAI-compatible speech
endpoint, ``/health`` and Prometheus ``/metrics`` (see protocol.py for the WebSocket protocol)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import struct
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..errors import EngineBusy, EngineClosed, InvalidRequest, MisoError
from ..request import SynthesisRequest
from . import protocol
from .protocol import Limits, ProtocolError

log = logging.getLogger(__name__)

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to expose the engine beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise SystemExit(
            f"error: refusing to listen on {host!r} (not loopback) without --token: anyone who can reach it "
            "could use the GPU. Pass --token SECRET (clients send 'Authorization: Bearer SECRET') or bind 127.0.0.1."
        )


class Metrics:
    """Prometheus figures of one server (own registry, so several apps can live in one process)."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active = Gauge("misotts_active_streams", "requests being streamed to clients", registry=r)
        queue = Gauge("misotts_queue_depth", "engine requests waiting for a batch slot", registry=r)
        queue.set_function(lambda: _safe(lambda: engine.metrics().queued))
        busy = Gauge("misotts_engine_active", "engine requests generating now", registry=r)
        busy.set_function(lambda: _safe(lambda: engine.metrics().active))
        slots = Gauge("misotts_engine_free_slots", "free engine batch slots", registry=r)
        slots.set_function(lambda: _safe(lambda: engine.free_slots))
        self.connections = Gauge("misotts_websocket_connections", "open /v1/stream connections", registry=r)
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


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, ProtocolError):
        return exc.code
    if isinstance(exc, InvalidRequest):
        return "invalid_request"
    if isinstance(exc, EngineBusy):
        return "busy"
    if isinstance(exc, EngineClosed):
        return "closed"
    if isinstance(exc, MisoError):
        return "invalid_request"
    return "internal"


def create_app(engine: Any, *, token: str | None = None, limits: Limits | None = None, model_name: str = "") -> FastAPI:
    """The FastAPI app serving ``engine`` (a :class:`MisoEngine`; the caller owns and closes it)."""
    limits = limits or Limits()
    metrics = Metrics(engine)
    app = FastAPI(title="misotts-agents", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.limits = limits

    def authorized(headers: Any) -> bool:
        if not token:
            return True
        value = headers.get("authorization", "")
        scheme, _, given = value.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def unauthorized() -> JSONResponse:
        return JSONResponse(
            {"error": {"message": "missing or wrong bearer token", "type": "authentication_error", "code": 401}},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        closed = engine.closed
        body = {"status": "closed" if closed else "ok", "model": model_name, "max_batch": engine.max_batch}
        if not closed:
            body["free_slots"] = engine.free_slots
        return JSONResponse(body, status_code=503 if closed else 200)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if not authorized(request.headers):
            return unauthorized()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- OpenAI-compatible speech -----------------------------------------------------------

    def openai_error(status: int, message: str, code: str) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)

    @app.post("/v1/audio/speech")
    async def speech(request: Request) -> Response:
        if not authorized(request.headers):
            return unauthorized()
        body = await request.body()
        if len(body) > limits.max_message_bytes:
            return openai_error(413, "request body too large", "too_large")
        try:
            msg = json.loads(body)
            if not isinstance(msg, dict):
                raise ValueError("not an object")
        except ValueError:
            return openai_error(400, "the body must be a JSON object", "bad_json")
        text = msg.get("input")
        fmt = msg.get("response_format") or "wav"
        if not isinstance(text, str) or not text.strip():
            return openai_error(400, "'input' (the text to speak) is required", "invalid_request")
        if len(text) > limits.max_text_chars:
            return openai_error(
                400, f"input too long: {len(text)} characters (at most {limits.max_text_chars})", "too_large"
            )
        if fmt not in ("pcm", "wav"):
            return openai_error(400, f"response_format {fmt!r} is not supported: use 'pcm' or 'wav'", "unsupported")
        if msg.get("stream_format") not in (None, "audio"):
            return openai_error(400, "only stream_format 'audio' is supported", "unsupported")
        speed = msg.get("speed", 1.0)
        if speed not in (None, 1, 1.0):
            return openai_error(400, "speed other than 1.0 is not supported", "unsupported")
        voice = msg.get("voice")
        speaker = 0
        if isinstance(voice, int) and not isinstance(voice, bool):
            speaker = voice
        elif isinstance(voice, str) and voice.isdigit():
            speaker = int(voice)
        try:
            extra = {k: msg[k] for k in ("seed", "temperature", "topk", "max_audio_ms") if msg.get(k) is not None}
            req = SynthesisRequest(text=text, speaker=speaker, **extra)  # non-OpenAI extras: seed, sampling, length
            stream = engine.stream(req)
        except Exception as exc:
            metrics.finished("openai", "rejected")
            status = 503 if isinstance(exc, (EngineBusy, EngineClosed)) else 400
            return openai_error(status, str(exc), _error_code(exc))
        metrics.active.inc()
        try:
            first = await stream.__anext__()  # errors from preparation still get a status code
        except StopAsyncIteration:
            first = None
        except Exception as exc:
            metrics.active.dec()
            stream.cancel()
            metrics.finished("openai", "error")
            return openai_error(400 if isinstance(exc, MisoError) else 500, str(exc), _error_code(exc))

        async def body_iter():
            outcome = "cancelled"
            try:
                if fmt == "wav":
                    yield wav_header()
                if first is not None:
                    yield protocol.to_int16(first.pcm)
                    metrics.audio_seconds.inc(first.duration_s)
                    async for chunk in stream:
                        yield protocol.to_int16(chunk.pcm)
                        metrics.audio_seconds.inc(chunk.duration_s)
                outcome = "completed"
            except MisoError as exc:
                outcome = "error"
                log.warning("speech request failed mid-stream: %s", exc)
            finally:
                stream.cancel()
                metrics.active.dec()
                metrics.finished("openai", outcome, stream.stats)

        media = "audio/wav" if fmt == "wav" else "audio/pcm"
        return StreamingResponse(body_iter(), media_type=media, headers={"X-Sample-Rate": "24000"})

    # -- WebSocket stream -------------------------------------------------------------------

    @app.websocket("/v1/stream")
    async def ws_stream(ws: WebSocket) -> None:
        await ws.accept()
        if not authorized(ws.headers):
            await ws.close(code=1008, reason="missing or wrong bearer token")
            return
        metrics.connections.inc()
        conn = _Connection(ws, engine, limits, metrics)
        try:
            await conn.run()
        finally:
            await conn.shutdown()
            metrics.connections.dec()

    return app


def wav_header(sample_rate: int = 24_000) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (sizes 0xFFFFFFFF, as streaming
    servers commonly write)."""
    unknown = 0xFFFFFFFF
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", unknown)
    )


class _Connection:
    """One WebSocket client: its running requests (tasks by id), serialised sends."""

    def __init__(self, ws: WebSocket, engine: Any, limits: Limits, metrics: Metrics) -> None:
        self.ws = ws
        self.engine = engine
        self.limits = limits
        self.metrics = metrics
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.cancelled: set[str] = set()
        self.send_lock = asyncio.Lock()
        self.open = True

    async def send_text(self, text: str) -> None:
        if not self.open:
            return
        async with self.send_lock:
            await self.ws.send_text(text)

    async def send_bytes(self, data: bytes) -> None:
        if not self.open:
            return
        async with self.send_lock:
            await self.ws.send_bytes(data)

    async def run(self) -> None:
        while True:
            try:
                event = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if event["type"] == "websocket.disconnect":
                return
            text = event.get("text")
            if text is None:
                await self.send_text(protocol.error_message("bad_message", "send JSON text messages, not binary"))
                continue
            try:
                await self.handle(protocol.parse_json(text, self.limits))
            except ProtocolError as exc:
                await self.send_text(protocol.error_message(exc.code, exc.message, exc.rid))
            except (WebSocketDisconnect, RuntimeError):
                return

    async def handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "start":
            rid = protocol.request_id(msg)
            try:
                if rid in self.tasks:
                    raise ProtocolError("duplicate_id", f"request {rid!r} is already running")
                if len(self.tasks) >= self.limits.max_concurrent_per_connection:
                    raise ProtocolError(
                        "too_many",
                        f"at most {self.limits.max_concurrent_per_connection} concurrent requests per connection",
                    )
                request = protocol.parse_start(msg, self.limits)
                stream = self.engine.stream(request)
            except Exception as exc:
                self.metrics.finished("websocket", "rejected")
                await self.send_text(protocol.error_message(_error_code(exc), str(exc), rid))
                return
            self.tasks[rid] = asyncio.create_task(self.pump(rid, stream, bool(msg.get("codes"))))
        elif kind == "cancel":
            rid = protocol.request_id(msg)
            task = self.tasks.get(rid)
            if task is not None and rid not in self.cancelled:
                self.cancelled.add(rid)
                task.cancel()
        elif kind == "ping":
            await self.send_text(protocol.message("pong"))
        elif kind in ("append", "end"):
            raise ProtocolError("unsupported", "incremental text (append/end) is not supported yet", msg.get("id"))
        else:
            raise ProtocolError("unknown_type", f"unknown message type {kind!r}", _maybe_id(msg))

    async def pump(self, rid: str, stream: Any, want_codes: bool) -> None:
        """Stream one request's audio to the client, then its end (or error) message."""
        self.metrics.active.inc()
        outcome = "completed"
        try:
            async for chunk in stream:
                await self.send_bytes(
                    protocol.pack_audio(rid, chunk.start_frame, chunk.frames, chunk.final, protocol.to_int16(chunk.pcm))
                )
                self.metrics.audio_seconds.inc(chunk.duration_s)
            end = {"id": rid, "stats": protocol.stats_dict(stream.stats)}
            if want_codes:
                end["codes"] = stream.codes.tolist()
            await self.send_text(protocol.message("end", **end))
        except asyncio.CancelledError:
            stream.cancel()
            if rid in self.cancelled:  # the client's cancel: tell it the id is free
                outcome = "cancelled"
                stats = protocol.stats_dict(stream.stats)
                stats["stop_reason"] = "cancelled"
                with contextlib.suppress(Exception):
                    await self.send_text(protocol.message("end", id=rid, stats=stats))
            else:
                outcome = "disconnected"
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:  # the client went away mid-send
            stream.cancel()
            outcome = "disconnected"
            log.debug("stream %s: client gone: %s", rid, exc)
        except Exception as exc:
            stream.cancel()
            outcome = "error"
            with contextlib.suppress(Exception):
                await self.send_text(protocol.error_message(_error_code(exc), str(exc), rid))
        finally:
            stream.cancel()
            self.tasks.pop(rid, None)
            self.cancelled.discard(rid)
            self.metrics.active.dec()
            self.metrics.finished("websocket", outcome, stream.stats)

    async def shutdown(self) -> None:
        """The client is gone: cancel every request it still had, freeing their slots now."""
        self.open = False
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _maybe_id(msg: dict[str, Any]) -> str | None:
    rid = msg.get("id")
    return rid if isinstance(rid, str) else None

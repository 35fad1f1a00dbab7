"""The engine server: one shared MisoEngine behind a WebSocket stream, an OpenAI-compatible speech
endpoint, ``/health`` and Prometheus ``/metrics`` (see protocol.py for the WebSocket protocol)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from misotts_agents.audio import FRAME_MS, SAMPLE_RATE, to_int16
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.errors import InvalidRequest, MisoError, http_status, to_wire
from misotts_agents.server import protocol
from misotts_agents.server.encode import FORMATS, StreamEncoder
from misotts_agents.server.protocol import Limits, ProtocolError
from misotts_agents.server.sessions import EngineBackend
from misotts_agents.server.textfeed import TextFeed

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

    def __init__(self, backend: Any) -> None:
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


def create_app(
    engine: Any,
    *,
    token: str | None = None,
    limits: Limits | None = None,
    model_name: str = "",
    voices: dict[str, VoicePrompt] | None = None,
) -> FastAPI:
    """The FastAPI app serving ``engine``: a :class:`MisoEngine` (the caller owns and closes it),
    or a backend (an :class:`EngineBackend` or a proxy with its methods, as the Ray Serve ingress).
    ``voices`` are the named voices of a MisoEngine's backend."""
    limits = limits or Limits()
    if hasattr(engine, "start"):
        if voices:
            raise ValueError("pass named voices to the backend, not to create_app")
        backend = engine
    else:
        backend = EngineBackend(engine, limits, voices)
    metrics = Metrics(backend)
    app = FastAPI(title="misotts-agents", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.backend = backend
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
        closed = backend.closed
        body = {"status": "closed" if closed else "ok", "model": model_name, "max_batch": backend.max_batch}
        if not closed:
            body["free_slots"] = backend.free_slots
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

    def refused(exc: BaseException) -> JSONResponse:
        code, message, _ = to_wire(exc)
        return openai_error(http_status(exc), message, code)

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
        if fmt not in FORMATS:
            supported = ", ".join(FORMATS)
            return openai_error(400, f"response_format {fmt!r} is not supported: use one of {supported}", "unsupported")
        if msg.get("stream_format") not in (None, "audio"):
            return openai_error(400, "only stream_format 'audio' is supported", "unsupported")
        speed = msg.get("speed", 1.0)
        if speed not in (None, 1, 1.0):
            return openai_error(400, "speed other than 1.0 is not supported", "unsupported")
        voice = msg.get("voice")
        start: dict[str, Any] = {"type": "start", "id": "speech", "text": text}
        if isinstance(voice, int) and not isinstance(voice, bool):
            start["speaker"] = voice
        elif isinstance(voice, str) and voice.isdigit():
            start["speaker"] = int(voice)
        elif isinstance(voice, str) and getattr(backend, "voices", None):
            start["voice"] = voice  # one of the server's named voices (an unknown name is a 400)
        # Other OpenAI voice names mean the default voice on a server without named voices.
        # Non-OpenAI extras: a session (turn memory, voice), seed, sampling and length.
        for key in ("session", "seed", "temperature", "topk", "max_audio_ms"):
            if msg.get(key) is not None:
                start[key] = msg[key]
        try:
            stream = backend.start(start)
        except Exception as exc:
            metrics.finished("openai", "rejected")
            return refused(exc)
        metrics.active.inc()
        try:
            first = await stream.__anext__()  # errors from preparation still get a status code
        except StopAsyncIteration:
            first = None
        except Exception as exc:
            metrics.active.dec()
            stream.cancel()
            metrics.finished("openai", "error")  # a backend may refuse here rather than in start() (Ray Serve)
            return refused(exc)

        async def body_iter():
            outcome = "cancelled"
            encoder = None
            try:
                encoder = StreamEncoder(fmt)  # each chunk encoded as it comes (server/encode.py)
                if first is not None:
                    yield encoder.encode(first.pcm)
                    metrics.audio_seconds.inc(first.duration_s)
                    async for chunk in stream:
                        yield encoder.encode(chunk.pcm)
                        metrics.audio_seconds.inc(chunk.duration_s)
                yield encoder.finish()
                outcome = "completed"
            except MisoError as exc:
                outcome = "error"
                log.warning("speech request failed mid-stream: %s", exc)
            finally:
                if encoder is not None:
                    encoder.close()
                stream.cancel()
                metrics.active.dec()
                metrics.finished("openai", outcome, stream.stats)

        headers = {"X-Sample-Rate": str(SAMPLE_RATE)}
        return StreamingResponse(body_iter(), media_type=FORMATS[fmt].content_type, headers=headers)

    # -- WebSocket stream -------------------------------------------------------------------

    @app.websocket("/v1/stream")
    async def ws_stream(ws: WebSocket) -> None:
        await ws.accept()
        if not authorized(ws.headers):
            await ws.close(code=1008, reason="missing or wrong bearer token")
            return
        metrics.connections.inc()
        conn = _Connection(ws, backend, limits, metrics)
        try:
            await conn.run()
        finally:
            await conn.shutdown()
            metrics.connections.dec()

    return app


class _Connection:
    """One WebSocket client: its running requests (tasks by id), their text feeds, serialised sends."""

    def __init__(self, ws: WebSocket, backend: Any, limits: Limits, metrics: Metrics) -> None:
        self.ws = ws
        self.backend = backend
        self.limits = limits
        self.metrics = metrics
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.feeds: dict[str, TextFeed] = {}  # the incremental requests' text
        self.cancelled: set[str] = set()
        self.sessions: set[str] = set()  # the session ids this client used
        self.audio = protocol.AudioStore(limits.max_cached_audio_bytes)
        self.send_lock = asyncio.Lock()
        self.open = True

    async def send_text(self, text: str) -> None:
        await self._send(self.ws.send_text, text)

    async def send_bytes(self, data: bytes) -> None:
        await self._send(self.ws.send_bytes, data)

    async def _send(self, send: Any, data: Any) -> None:
        if not self.open:
            return
        async with self.send_lock:
            try:
                await send(data)
            except (WebSocketDisconnect, RuntimeError, OSError) as exc:  # Starlette: RuntimeError once closed
                self.open = False
                raise _ClientGone(str(exc)) from exc

    async def run(self) -> None:
        """Handle the client's messages until it goes away."""
        with contextlib.suppress(_ClientGone, WebSocketDisconnect):
            while True:
                try:
                    event = await self.ws.receive()
                except RuntimeError:  # Starlette, once the socket is closed
                    return
                if event["type"] == "websocket.disconnect":
                    return
                if event.get("text") is None:
                    await self.send_text(protocol.error_message("bad_message", "send JSON text messages, not binary"))
                else:
                    await self.on_message(event["text"])

    async def on_message(self, text: str) -> None:
        """Handle one message; whatever goes wrong becomes an error message, and the connection stays."""
        try:
            await self.handle(protocol.parse_json(text, self.limits))
        except (_ClientGone, WebSocketDisconnect):
            raise
        except (ProtocolError, MisoError) as exc:
            await self.send_text(protocol.exception_message(exc, getattr(exc, "rid", None)))
        except Exception as exc:  # a bug here must not take the connection down with it
            log.exception("handling a message failed")
            await self.send_text(protocol.exception_message(exc))

    def use_session(self, msg: dict[str, Any]) -> str | None:
        sid = protocol.session_id(msg)
        if sid is not None and sid not in self.sessions:
            if len(self.sessions) >= self.limits.max_sessions_per_connection:
                raise ProtocolError(
                    "too_many", f"at most {self.limits.max_sessions_per_connection} sessions per connection"
                )
            self.sessions.add(sid)
        return sid

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
                self.use_session(msg)
                msg = self.audio.resolve(msg)
                if msg.get("incremental"):
                    text = msg.get("text") or ""
                    if not isinstance(text, str):
                        raise InvalidRequest("'text' must be a string")
                    # The options are checked now, not when the first sentence is complete.
                    protocol.parse_start(msg | {"text": "Check."}, self.limits, getattr(self.backend, "voices", None))
                    feed = self.feeds[rid] = TextFeed(self.limits.max_text_chars)
                    feed.append(text)
                    parts = self.incremental_parts(msg, feed)
                else:
                    parts = _one(self.backend.start(msg))
            except Exception as exc:
                self.feeds.pop(rid, None)
                self.metrics.finished("websocket", "rejected")
                await self.send_text(protocol.exception_message(exc, rid))
                return
            self.tasks[rid] = asyncio.create_task(self.pump(rid, parts, bool(msg.get("codes"))))
        elif kind in ("append", "end"):
            rid = protocol.request_id(msg)
            feed = self.feeds.get(rid)
            if feed is None:
                raise ProtocolError("bad_message", f"no incremental request {rid!r} is waiting for text", rid)
            if kind == "end":
                feed.end()
                return
            text = msg.get("text", "")
            if not isinstance(text, str) or len(text) > self.limits.max_text_chars:
                raise ProtocolError(
                    "bad_message", f"'text' must be a string of at most {self.limits.max_text_chars}", rid
                )
            feed.append(text, flush=msg.get("flush") is True)
        elif kind == "cancel":
            rid = protocol.request_id(msg)
            task = self.tasks.get(rid)
            if task is not None and rid not in self.cancelled:
                self.cancelled.add(rid)
                task.cancel()
        elif kind == "session":
            self.use_session(msg)
            reply = await self.backend.session(msg)
            await self.send_text(protocol.message("session", **reply))
        elif kind == "ping":
            await self.send_text(protocol.message("pong"))
        else:
            raise ProtocolError("unknown_type", f"unknown message type {kind!r}", _maybe_id(msg))

    async def incremental_parts(self, msg: dict[str, Any], feed: TextFeed) -> AsyncIterator[tuple[Any, bool]]:
        """One backend request per sentence, all in one session so each is conditioned on the parts
        already spoken; a request without a session gets a private one for its lifetime."""
        sid = protocol.session_id(msg) or f"~{uuid.uuid4().hex}"
        base = {k: v for k, v in msg.items() if k not in ("text", "incremental")} | {"session": sid}
        first, last = True, False
        try:
            async for text, last in feed.parts():
                yield self.backend.start(base | {"text": text, "continue": not first, "more": not last}), last
                first = False
        finally:
            if sid != msg.get("session"):
                await self.backend.session({"session": sid, "op": "close"})
            elif not first and not last:  # the end came after the last part started: close the turn
                interrupted = not feed.ended
                await self.backend.session({"session": sid, "op": "end_turn", "interrupted": interrupted})

    async def pump(self, rid: str, parts: AsyncIterator[tuple[Any, bool]], want_codes: bool) -> None:
        """Stream a request's audio (its backend streams, one after the other, each with whether it is
        the last) to the client, then its end (or error) message."""
        self.metrics.active.inc()
        outcome = "completed"
        started = time.perf_counter()
        current, done = None, []
        try:
            async for stream, last in parts:
                current, offset = stream, sum(s.stats.frames for s in done)
                async for chunk in stream:
                    pcm = to_int16(chunk.pcm)
                    final = chunk.final and last
                    await self.send_bytes(
                        protocol.pack_audio(rid, offset + chunk.start_frame, chunk.frames, final, pcm)
                    )
                    self.metrics.audio_seconds.inc(chunk.duration_s)
                done.append(stream)
                current = None
            end = {"id": rid, "stats": _merged_stats(done, started)}
            if want_codes:
                end["codes"] = [row for s in done for row in s.codes.tolist()]
            await self.send_text(protocol.message("end", **end))
        except asyncio.CancelledError:
            if rid in self.cancelled:  # the client's cancel: tell it the id is free
                outcome = "cancelled"
                stats = _merged_stats([*done, current] if current is not None else done, started)
                stats["stop_reason"] = "cancelled"
                with contextlib.suppress(Exception):
                    await self.send_text(protocol.message("end", id=rid, stats=stats))
            else:
                outcome = "disconnected"
        except _ClientGone as exc:  # the client went away mid-send (engine errors, RuntimeError too, go below)
            outcome = "disconnected"
            log.debug("stream %s: client gone: %s", rid, exc)
        except Exception as exc:
            outcome = "error"
            with contextlib.suppress(Exception):
                await self.send_text(protocol.exception_message(exc, rid))
        finally:
            if current is not None:
                current.cancel()
            with contextlib.suppress(Exception):
                await parts.aclose()
            self.tasks.pop(rid, None)
            self.feeds.pop(rid, None)
            self.cancelled.discard(rid)
            self.metrics.active.dec()
            first = (done or [current])[0]
            self.metrics.finished("websocket", outcome, first.stats if first is not None else None)

    async def shutdown(self) -> None:
        """The client is gone: cancel every request it still had, freeing their slots now."""
        self.open = False
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def _one(stream: Any) -> AsyncIterator[tuple[Any, bool]]:
    yield stream, True


def _merged_stats(streams: list[Any], started: float) -> dict[str, Any]:
    """One request's end stats; for text spoken in parts, the parts' figures combined."""
    if not streams:
        return {"frames": 0, "stop_reason": "empty", "parts": 0, "elapsed_s": time.perf_counter() - started}
    stats = protocol.stats_dict(streams[0].stats)
    if len(streams) > 1:
        frames = sum(s.stats.frames for s in streams)
        elapsed = time.perf_counter() - started
        stats |= {
            "frames": frames,
            "stop_reason": streams[-1].stats.stop_reason,
            "prompt_frames": streams[-1].stats.prompt_frames,
            "elapsed_s": elapsed,
            "real_time_factor": elapsed / (frames * FRAME_MS / 1000) if frames else None,
        }
    stats["parts"] = len(streams)
    return stats


class _ClientGone(Exception):
    """A send failed: the client is gone."""


def _maybe_id(msg: dict[str, Any]) -> str | None:
    rid = msg.get("id")
    return rid if isinstance(rid, str) else None

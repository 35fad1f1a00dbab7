"""One WebSocket client of ``/v1/stream``: its messages and its running requests.

Everything a client sends is validated by the schema (schema.py) and answered: a bad message gets
an ``error`` (logged as one line, no stack trace) and the connection goes on. Requests run as tasks
(one per id) that pump engine audio into the connection's :class:`Outbox` (outbox.py), a send queue
bounded in bytes with one writer. A client that stops reading fills it; when a request has waited
``send_timeout_s`` for room, the client is cut off: its requests are cancelled (their engine slots
freed at the next step) and the connection is closed, so a client that never reads holds neither
memory nor engine slots for longer than that.

The backend gets the validated message itself (a copy of the model, never a dict validated again),
with the names the client chose made its tenant's (tenants.py): sessions scoped (``tenant/name``),
audio ids resolved from the tenant's part of the memory budget (budget.py), a voice name the
tenant's own before the server's shared ones; and the tenant and this connection, the keys the
engine admits fairly by, within the tenant's cap on waiting requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any, TypeVar

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import BaseModel

from misotts_agents.audio import FRAME_MS, to_int16
from misotts_agents.engine.audio_stream import AudioStream
from misotts_agents.errors import EngineClosed, MisoError
from misotts_agents.server import protocol, schema
from misotts_agents.server.budget import MemoryBudget
from misotts_agents.server.lifecycle import Lifecycle
from misotts_agents.server.outbox import ClientGone, Outbox
from misotts_agents.server.protocol import Limits, ProtocolError
from misotts_agents.server.rate import TokenBucket
from misotts_agents.server.tenants import Quotas, private_session, scope, scoped_voice
from misotts_agents.server.textfeed import TextFeed

log = logging.getLogger(__name__)

CLOSE_NOT_READING = 4008  # the close code of a client cut off for not reading (protocol.py)
TRANSPORT_KEY = "misotts.transport"  # in a WebSocket's scope: uvicorn's transport of the connection
_Audio = TypeVar("_Audio", bound=schema.AudioItem)


class Connection:
    """One WebSocket client of tenant ``tenant``: handles its messages until it goes away."""

    def __init__(
        self,
        ws: WebSocket,
        backend: Any,
        limits: Limits,
        metrics: Any,
        tenant: str,
        quotas: Quotas,
        budget: MemoryBudget,
        lifecycle: Lifecycle,
    ) -> None:
        self.ws = ws
        self.backend = backend
        self.limits = limits
        self.metrics = metrics
        self.tenant = tenant
        self.quotas = quotas
        self.budget = budget
        self.lifecycle = lifecycle
        self.peer = f"{ws.client.host}:{ws.client.port}" if ws.client else "?"
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.feeds: dict[str, TextFeed] = {}  # the incremental requests' text
        self.cancelled: set[str] = set()
        self.sessions: set[str] = set()  # the session names this client used
        self.outbox = Outbox(ws, limits.send_buffer_bytes, limits.send_timeout_s, self._stuck)
        self.rate = TokenBucket(limits.max_messages_per_s, limits.message_burst)  # every message, pings too
        self.stopping: str | None = None  # why the server ends this connection (shutdown, not reading, rate)
        self._stop = asyncio.Event()
        self._close_with = (1000, "")

    @property
    def busy(self) -> bool:
        return bool(self.tasks)

    async def send(self, data: str | bytes) -> None:
        await self.outbox.put(data)

    # -- the connection's life ------------------------------------------------------------------

    async def run(self) -> None:
        """Handle the client's messages until it goes away, is idle too long or is cut off."""
        writer = asyncio.create_task(self.outbox.run())
        stop = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                receive = asyncio.create_task(self.ws.receive())
                done, _ = await asyncio.wait(
                    {receive, stop}, timeout=self.limits.ws_idle_timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
                if receive not in done:
                    receive.cancel()
                    if stop in done:
                        await self._close(*self._close_with)
                        if self.stopping == "not reading":
                            self._abort()
                        return
                    if self.tasks:  # quiet, but its requests are running: not idle
                        continue
                    log.info("closing idle connection from %s (tenant %s)", self.peer, self.tenant)
                    await self._close(1001, "idle")
                    return
                try:
                    event = receive.result()
                except (RuntimeError, WebSocketDisconnect):  # Starlette, once the socket is closed
                    return
                if event["type"] == "websocket.disconnect":
                    return
                if not self.rate.take():
                    await self._over_rate()
                    return
                if event.get("text") is None:
                    await self.refuse(ProtocolError("bad_message", "send JSON text messages, not binary"))
                else:
                    await self.on_message(event["text"])
        except ClientGone:
            return
        finally:
            stop.cancel()
            await self.end_requests()
            await self.outbox.close()
            writer.cancel()
            with contextlib.suppress(BaseException):
                await writer

    async def _over_rate(self) -> None:
        """Over the message rate limit (rate.py): one ``error``, then the connection closes (1008);
        its requests are cancelled as the connection ends."""
        self.stopping = "message rate"
        log.warning("closing %s (tenant %s): over %g messages a second", self.peer, self.tenant, self.rate.rate)
        limit = f"over the message rate limit ({self.rate.rate:g} a second, bursts of {self.rate.burst:g})"
        await self.refuse(ProtocolError("too_many", limit))
        await self.outbox.flushed(2.0)
        await self._close(1008, protocol.CLOSE_MESSAGE_RATE)

    def _stuck(self) -> None:
        """A send waited too long: the client does not read. Cut it off (see the module)."""
        if self.stopping is None:
            self.stopping = "not reading"
            self._close_with = (CLOSE_NOT_READING, "not reading")
            log.warning(
                "cutting off %s (tenant %s): it read nothing for %g s", self.peer, self.tenant, self.outbox.timeout_s
            )
        self._stop.set()

    async def shutdown(self) -> None:
        """The server is stopping: every running request ends with an ``error`` (``closed``), then
        the connection closes (1001)."""
        self.stopping = "server shutting down"
        await self.end_requests()
        await self.outbox.flushed(2.0)
        self._close_with = (1001, "server shutting down")
        self._stop.set()

    async def end_requests(self) -> None:
        """Cancel every request still running (their slots are freed at the next engine step)."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _abort(self) -> None:
        """Drop the TCP connection without flushing: a client that does not read would otherwise
        keep it, and what is buffered for it, open (app.py records the server's transport)."""
        transport = self.ws.scope.get(TRANSPORT_KEY)
        if transport is not None:
            transport.abort()

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):  # a client that does not read may never take the close frame
            async with asyncio.timeout(2.0):
                await self.ws.close(code=code, reason=reason)

    # -- messages -------------------------------------------------------------------------------

    async def on_message(self, text: str) -> None:
        """Handle one message; whatever goes wrong becomes an error message, and the connection stays."""
        try:
            await self.handle(schema.parse_message(text, self.limits))
        except ClientGone:
            raise
        except (ProtocolError, MisoError) as exc:
            await self.refuse(exc, getattr(exc, "rid", None))
        except Exception as exc:  # a bug here must not take the connection down with it
            log.exception("handling a message failed")
            await self.send(protocol.exception_message(exc))

    async def refuse(self, exc: BaseException, rid: str | None = None) -> None:
        """Answer bad input with an ``error``; one log line, no stack trace (it is not our fault)."""
        message = protocol.exception_message(exc, rid)
        log.info("refused a message from %s (tenant %s): %s", self.peer, self.tenant, _short(str(exc)))
        await self.send(message)

    def use_session(self, name: str | None) -> str | None:
        """The backend's id of session ``name`` (scoped to the tenant), counted for this connection."""
        if name is None:
            return None
        if name not in self.sessions:
            if len(self.sessions) >= self.limits.max_sessions_per_connection:
                raise ProtocolError(
                    "too_many", f"at most {self.limits.max_sessions_per_connection} sessions per connection"
                )
            self.sessions.add(name)
        return scope(self.tenant, name)

    async def handle(self, msg: BaseModel) -> None:
        if isinstance(msg, schema.Start):
            await self.start(msg)
        elif isinstance(msg, schema.Append | schema.End):
            feed = self.feeds.get(msg.id)
            if feed is None:
                raise ProtocolError("bad_message", f"no incremental request {msg.id!r} is waiting for text", msg.id)
            if isinstance(msg, schema.Append):
                feed.append(msg.text, flush=msg.flush)
            else:
                feed.end()
        elif isinstance(msg, schema.Cancel):
            task = self.tasks.get(msg.id)
            if task is not None and msg.id not in self.cancelled:
                self.cancelled.add(msg.id)
                task.cancel()
        elif isinstance(msg, schema.Session):
            update = {"session": self.use_session(msg.session), "voice": self.backend_voice(msg.voice)}
            reply = await self.backend.session(msg.model_copy(update=update))
            await self.send(protocol.message("session", **(reply | {"session": msg.session})))
        elif isinstance(msg, schema.Ping):
            await self.send(protocol.message("pong"))

    async def start(self, msg: schema.Start) -> None:
        rid = msg.id
        streams_counted = False
        try:
            if self.stopping is not None or self.lifecycle.draining:
                raise EngineClosed("the server is shutting down: it takes no more requests")
            if rid in self.tasks:
                raise ProtocolError("duplicate_id", f"request {rid!r} is already running")
            if len(self.tasks) >= self.limits.max_concurrent_per_connection:
                raise ProtocolError(
                    "too_many",
                    f"at most {self.limits.max_concurrent_per_connection} concurrent requests per connection",
                )
            start = self.backend_start(msg)
            self.quotas.start_stream(self.tenant)
            streams_counted = True
            if msg.incremental:
                # The options are checked now, not when the first sentence is complete.
                schema.parse_start(start.model_copy(update={"text": "Check."}), getattr(self.backend, "voices", None))
                feed = self.feeds[rid] = TextFeed(self.limits.max_text_chars)
                feed.append(msg.text)
                parts = self.incremental_parts(start, feed)
            else:
                parts = _one(self.backend_stream(start))
        except Exception as exc:
            if streams_counted:
                self.quotas.end_stream(self.tenant)
            self.feeds.pop(rid, None)
            self.metrics.finished("websocket", "rejected")
            if isinstance(exc, (ProtocolError, MisoError)):
                await self.refuse(exc, rid)
            else:
                log.exception("starting a request failed")
                await self.send(protocol.exception_message(exc, rid))
            return
        self.tasks[rid] = asyncio.create_task(self.pump(rid, parts, msg.codes, msg.words, msg.queue))

    def backend_start(self, msg: schema.Start) -> schema.Start:
        """The start as the backend takes it: the session scoped, audio ids resolved, voice names
        the tenant's (a copy: nothing validated again)."""
        update: dict[str, Any] = {"session": self.use_session(msg.session), "voice": self.backend_voice(msg.voice)}
        if "context" in msg.model_fields_set:
            update["context"] = [self.resolve(item) for item in msg.context]
        return msg.model_copy(update=update)

    def backend_stream(self, start: schema.Start) -> Any:
        """The backend's stream for ``start``, within the tenant's cap on waiting requests (tenants.py);
        this connection and its tenant are the keys the engine shares its slots fairly by."""
        return self.quotas.start_waiting(
            self.tenant, lambda: self.backend.start(start, client=self, tenant=self.tenant)
        )

    def backend_voice(self, voice: str | schema.VoiceItem | None) -> str | schema.VoiceItem | None:
        """A voice as the backend takes it: an object with its audio, a name the tenant's own first."""
        if isinstance(voice, schema.VoiceItem):
            return self.resolve(voice)
        if isinstance(voice, str):
            return scoped_voice(getattr(self.backend, "voices", None), self.tenant, voice)
        return None

    def resolve(self, item: _Audio) -> _Audio:
        """An audio item with its audio: sent now (and kept under its ``audio_id``), or kept before."""
        if item.audio_id is None:
            return item
        if item.audio_b64:
            self.budget.keep_audio(self.tenant, item.audio_id, item.audio_b64)
            return item
        return item.model_copy(update={"audio_b64": self.budget.audio(self.tenant, item.audio_id)})

    async def incremental_parts(self, start: schema.Start, feed: TextFeed) -> AsyncGenerator[tuple[Any, bool], None]:
        """One backend request per sentence, all in one session so each is conditioned on the parts
        already spoken; a request without a session gets a private one for its lifetime."""
        own = start.session
        sid = own or private_session(self.tenant)
        base = start.model_copy(update={"incremental": False, "session": sid})
        first, last = True, False
        try:
            async for text, last in feed.parts():
                part = base.model_copy(update={"text": text, "continue_": not first, "more": not last})
                yield self.backend_stream(part), last
                first = False
        finally:
            if own is None:
                await self.backend.session(_session_op(sid, schema.SessionOp.CLOSE))
            elif not first and not last:  # the end came after the last part started: close the turn
                await self.backend.session(_session_op(sid, schema.SessionOp.END_TURN, interrupted=not feed.ended))

    # -- a request's audio ----------------------------------------------------------------------

    async def pump(
        self,
        rid: str,
        parts: AsyncGenerator[tuple[Any, bool], None],
        want_codes: bool,
        want_words: bool,
        want_queue: bool,
    ) -> None:
        """Stream a request's audio (its backend streams, one after the other, each with whether it is
        the last) to the client, then its end (or error) message."""
        self.metrics.active.inc()
        outcome = "completed"
        started = time.perf_counter()
        current, done = None, []
        watch: asyncio.Task[None] | None = None
        try:
            async for stream, last in parts:
                current, offset = stream, sum(s.stats.frames for s in done)
                if want_queue and not done:
                    watch = asyncio.create_task(self.report_queue(rid, stream))
                async for chunk in stream:
                    if want_words and chunk.words:  # the words of the audio frame that follows
                        await self.send(protocol.words_message(rid, chunk.words, offset * FRAME_MS / 1000))
                    elif not chunk.frames:  # an empty final chunk only carries words
                        continue
                    pcm = to_int16(chunk.pcm)
                    final = chunk.final and last
                    await self.send(protocol.pack_audio(rid, offset + chunk.start_frame, chunk.frames, final, pcm))
                    self.metrics.audio_seconds.inc(chunk.duration_s)
                done.append(stream)
                current = None
            end = {"id": rid, "stats": _merged_stats(done, started)}
            if want_codes:
                end["codes"] = [row for s in done for row in s.codes.tolist()]
            await self.send(protocol.message("end", **end))
        except asyncio.CancelledError:
            if rid in self.cancelled or self.stopping == "server shutting down":
                # The client's cancel (tell it the id is free), or the server's shutdown (say why).
                outcome = "cancelled"
                stats = _merged_stats([*done, current] if current is not None else done, started)
                stats["stop_reason"] = "cancelled"
                reply = (
                    protocol.message("end", id=rid, stats=stats)
                    if rid in self.cancelled
                    else protocol.exception_message(EngineClosed("the server is shutting down"), rid)
                )
                with contextlib.suppress(Exception):
                    await self.send(reply)
            else:
                outcome = "disconnected"
        except ClientGone as exc:  # the client went away mid-send (engine errors, RuntimeError too, go below)
            outcome = "disconnected"
            log.debug("stream %s: client gone: %s", rid, exc)
        except Exception as exc:
            outcome = "error"
            if not isinstance(exc, MisoError):
                log.error("request %s of %s failed: %s: %s", rid, self.peer, type(exc).__name__, exc)
            with contextlib.suppress(Exception):
                await self.send(protocol.exception_message(exc, rid))
        finally:
            if watch is not None:
                watch.cancel()
            if current is not None:
                current.cancel()
            with contextlib.suppress(Exception):
                await parts.aclose()
            self.tasks.pop(rid, None)
            self.feeds.pop(rid, None)
            self.cancelled.discard(rid)
            self.quotas.end_stream(self.tenant)
            self.metrics.active.dec()
            first = (done or [current])[0]
            self.metrics.finished("websocket", outcome, first.stats if first is not None else None)

    async def report_queue(self, rid: str, stream: AudioStream) -> None:
        """Tell the client when its request waits for an engine slot (``queued``) and when it has one
        (``admitted``, also when it never waited), so its timeout for the first audio starts there."""
        try:
            if stream.queued:
                await self.send(protocol.message("queued", id=rid))
            if await stream.wait_admitted():
                await self.send(protocol.message("admitted", id=rid))
        except ClientGone:  # the pump sees it too, and ends the request
            return


def _session_op(sid: str, op: schema.SessionOp, interrupted: bool = False) -> schema.Session:
    """A ``session`` message of the server's own (already scoped, nothing to validate)."""
    return schema.Session.model_construct(type="session", session=sid, op=op, interrupted=interrupted)


async def _one(stream: Any) -> AsyncGenerator[tuple[Any, bool], None]:
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


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."

"""EngineBackend: what the server serves, one engine plus its conversations' server-side state.

A session (a conversation, named by the client) keeps its voice prompt and its turn memory on the
server, next to the engine whose caches they warm: a client tells the session each user turn once,
and every reply of the session is conditioned on the turns so far without the client resending
audio. The agent's own replies enter the memory as they are generated, cut where they were
cancelled (what the listener heard).

Sessions live in the server's one memory budget (budget.py), under their tenant: a session id
arrives scoped (``tenant/name``, tenants.py), sessions idle longer than ``ttl_s`` are forgotten, a
tenant's least recently used go first beyond ``max_sessions``, and the budget's bytes cover all
tenants' sessions and cached audio together. Turn audio is kept as owned copies, cut to the
memory's ``max_turn_s``: never a view that pins the whole clip a client sent.

The app (app.py) talks to this class only through ``start``/``session`` (validated models of
schema.py, which pickle: the Ray Serve ingress, ray/ingress.py, sends them on to its replicas as
they are) and a few figures, so a proxy with the same methods can serve the same protocol.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from misotts_agents.audio import SAMPLE_RATE
from misotts_agents.engine.memory import ConversationMemory
from misotts_agents.engine.miso_engine import MisoEngine
from misotts_agents.engine.request import AudioChunk, StreamStats
from misotts_agents.engine.stats import EngineStats
from misotts_agents.engine.stream import SpeechStream
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.errors import InvalidRequest
from misotts_agents.server import schema
from misotts_agents.server.budget import MemoryBudget
from misotts_agents.server.protocol import Limits
from misotts_agents.server.schema import SessionOp
from misotts_agents.server.tenants import unscope

SESSION_OVERHEAD_BYTES = 16 * 1024  # what an empty session costs (objects, its memory's buffers)


@dataclass
class Session:
    """One conversation's server-side state."""

    memory: ConversationMemory
    voice: VoicePrompt | None = None

    @property
    def nbytes(self) -> int:
        """The bytes it holds: turn audio, its voice prompt's audio, and a fixed overhead."""
        turns = sum(np.asarray(seg.audio).nbytes for seg in self.memory.context())
        voice = np.asarray(self.voice.audio).nbytes if self.voice is not None else 0
        return SESSION_OVERHEAD_BYTES + turns + voice


class SessionStore:
    """Sessions by scoped id (``tenant/name``) in a :class:`MemoryBudget` (its own unless given)."""

    def __init__(
        self,
        max_sessions: int = 256,
        ttl_s: float = 1800.0,
        max_turns: int = 4,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.max_turns = max_turns
        self.budget = budget or MemoryBudget(Limits().max_memory_bytes, max_sessions=max_sessions, session_ttl_s=ttl_s)

    def get(self, sid: str) -> Session:
        """The session ``sid``, created on first use."""
        tenant, name = unscope(sid)
        return self.budget.get_session(tenant, name, lambda: Session(ConversationMemory(max_turns=self.max_turns)))

    def changed(self, sid: str) -> None:
        """The session's state changed (a turn, a voice, a reply's end): count its size again."""
        self.budget.update_session(*unscope(sid))

    def close(self, sid: str) -> bool:
        return self.budget.close_session(*unscope(sid))

    def __contains__(self, sid: str) -> bool:
        return self.budget.has_session(*unscope(sid))

    def __len__(self) -> int:
        return self.budget.sessions


class SessionStream:
    """An engine stream whose audio also goes into the session's memory as the agent's turn."""

    def __init__(
        self, stream: SpeechStream, memory: ConversationMemory, more: bool, on_end: Callable[[], None] | None = None
    ) -> None:
        self._stream = stream
        self._memory = memory
        self._more = more  # more parts of this utterance follow: leave the agent turn open
        self._on_end = on_end
        self._done = False

    @property
    def stats(self) -> StreamStats:
        return self._stream.stats

    @property
    def codes(self) -> np.ndarray:
        return self._stream.codes

    @property
    def queued(self) -> bool:
        return self._stream.queued

    async def wait_admitted(self) -> bool:
        """The engine stream's: True once it has a slot, False if it ended without one."""
        return await self._stream.wait_admitted()

    def __aiter__(self) -> SessionStream:
        return self

    async def __anext__(self) -> AudioChunk:
        try:
            chunk = await self._stream.__anext__()
        except StopAsyncIteration:
            self._end(interrupted=False)
            raise
        except BaseException:
            self._end(interrupted=True)
            raise
        self._memory.push_agent_audio(chunk.pcm, chunk.words)
        return chunk

    def cancel(self) -> None:
        self._stream.cancel()
        self._end(interrupted=True)

    def _end(self, interrupted: bool) -> None:
        if not self._done:
            self._done = True
            if interrupted or not self._more:
                self._memory.agent_finished(interrupted=interrupted)
            if self._on_end is not None:
                self._on_end()


class EngineBackend:
    """One in-process engine served to clients, with per-session voice and turn memory.

    ``voices``: named voice prompts a request may ask for by name (``"voice": "anna"``; the OpenAI
    endpoint's ``voice``). The caller owns the engine and closes it.
    """

    def __init__(
        self,
        engine: MisoEngine,
        limits: Limits | None = None,
        voices: dict[str, VoicePrompt] | None = None,
        sessions: SessionStore | None = None,
    ) -> None:
        self.engine = engine
        limits = limits or Limits()
        self.voices = dict(voices or {})
        self.sessions = sessions or SessionStore(
            limits.max_sessions_per_tenant, limits.session_ttl_s, budget=MemoryBudget.for_limits(limits)
        )

    @property
    def budget(self) -> MemoryBudget:
        """The memory budget of its sessions, which the app shares for cached audio."""
        return self.sessions.budget

    # -- figures for /health and /metrics -----------------------------------------------------

    @property
    def max_batch(self) -> int:
        return self.engine.max_batch

    @property
    def closed(self) -> bool:
        return self.engine.closed

    @property
    def free_slots(self) -> int:
        return self.engine.free_slots

    def metrics(self) -> EngineStats | None:
        return self.engine.metrics()

    # -- requests -----------------------------------------------------------------------------

    def start(self, start: schema.Start, client: Hashable | None = None, tenant: Hashable | None = None) -> Any:
        """The stream for a validated ``start`` (its session scoped, its audio resolved: see
        connection.py); raises at once for one the engine refuses. ``client`` (a connection, an HTTP
        caller) and ``tenant`` are the keys the engine shares its preparation and slots fairly by."""
        request = schema.parse_start(start, self.voices)
        sid = start.session
        if sid is None:
            if start.continue_ or start.more:
                raise InvalidRequest("'continue' and 'more' need a 'session'")
            return self.engine.stream(request, client=client, tenant=tenant)
        session = self.sessions.get(sid)
        memory = session.memory
        continuing = start.continue_ and memory.agent_speaking
        turns = request.context if "context" in start.model_fields_set else None
        # A later part of an utterance is conditioned on the parts already spoken.
        context = memory.reply_context(turns, reply=None if continuing else ())
        request = dataclasses.replace(request, context=context, voice=request.voice or session.voice)
        stream = self.engine.stream(request, client=client, tenant=tenant)
        if continuing:
            memory.agent_add_text(request.text)
        else:
            memory.agent_speaker = request.speaker
            memory.agent_started(request.text)
        return SessionStream(stream, memory, more=start.more, on_end=lambda: self.sessions.changed(sid))

    async def session(self, m: schema.Session) -> dict[str, Any]:
        """Apply a validated ``session`` message (its session scoped); returns the fields of the reply."""
        sid, op = m.session, m.op
        if op is SessionOp.CLOSE:
            return {"session": sid, "op": op.value, "closed": self.sessions.close(sid)}
        session = self.sessions.get(sid)
        memory = session.memory
        if op is SessionOp.VOICE:
            session.voice = schema.parse_voice(m.voice, self.voices)
        elif op is SessionOp.USER_TURN:
            speaker, text, audio = schema.parse_turn(m)
            # An owned copy of what the memory keeps, never a view pinning the whole clip sent.
            memory.add_turn(speaker, text, audio[-int(memory.max_turn_s * SAMPLE_RATE) :].copy())
        elif op is SessionOp.END_TURN:  # the last part of an utterance sent with "more": it is complete
            memory.agent_finished(interrupted=m.interrupted)
        elif op is SessionOp.CLEAR:
            memory.clear()
        self.sessions.changed(sid)
        return {"session": sid, "op": op.value, "turns": len(memory.context()), "voice": session.voice is not None}

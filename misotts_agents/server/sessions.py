"""EngineBackend: what the server serves, one engine plus its conversations' server-side state.

A session (a conversation, named by the client) keeps its voice prompt and its turn memory on the
server, next to the engine whose caches they warm: a client tells the session each user turn once,
and every reply of the session is conditioned on the turns so far without the client resending
audio. The agent's own replies enter the memory as they are generated, cut where they were
cancelled (what the listener heard). Sessions idle longer than ``session_ttl_s`` are forgotten, and
the least recently used go first when there are more than ``max_sessions``.

The app (app.py) talks to this class only through ``start``/``session`` and a few figures, so a
proxy with the same methods (the Ray Serve ingress, ray_serve.py) can serve the same protocol.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from misotts_agents.engine.facade import MisoEngine
from misotts_agents.engine.memory import ConversationMemory
from misotts_agents.engine.request import AudioChunk, StreamStats
from misotts_agents.engine.scheduler import EngineStats
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.errors import InvalidRequest
from misotts_agents.server import protocol
from misotts_agents.server.protocol import Limits, ProtocolError


@dataclass
class Session:
    """One conversation's server-side state."""

    memory: ConversationMemory
    voice: VoicePrompt | None = None
    used_at: float = field(default_factory=time.monotonic)


class SessionStore:
    """Sessions by id: LRU with an idle timeout. Used from the server's event loop only."""

    def __init__(self, max_sessions: int = 1024, ttl_s: float = 1800.0, max_turns: int = 4) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.max_turns = max_turns
        self._items: OrderedDict[str, Session] = OrderedDict()

    def get(self, sid: str) -> Session:
        """The session ``sid``, created on first use."""
        self._expire()
        session = self._items.get(sid)
        if session is None:
            session = Session(ConversationMemory(max_turns=self.max_turns))
            self._items[sid] = session
            while len(self._items) > self.max_sessions:
                self._items.popitem(last=False)
        self._items.move_to_end(sid)
        session.used_at = time.monotonic()
        return session

    def close(self, sid: str) -> bool:
        return self._items.pop(sid, None) is not None

    def __contains__(self, sid: str) -> bool:
        return sid in self._items

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items:
            sid, oldest = next(iter(self._items.items()))
            if now - oldest.used_at <= self.ttl_s:
                break
            del self._items[sid]


class SessionStream:
    """An engine stream whose audio also goes into the session's memory as the agent's turn."""

    def __init__(self, stream: Any, memory: ConversationMemory, more: bool) -> None:
        self._stream = stream
        self._memory = memory
        self._more = more  # more parts of this utterance follow: leave the agent turn open
        self._done = False

    @property
    def stats(self) -> StreamStats:
        return self._stream.stats

    @property
    def codes(self) -> np.ndarray:
        return self._stream.codes

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
        self._memory.push_agent_audio(chunk.pcm)
        return chunk

    def cancel(self) -> None:
        self._stream.cancel()
        self._end(interrupted=True)

    def _end(self, interrupted: bool) -> None:
        if not self._done:
            self._done = True
            if interrupted or not self._more:
                self._memory.agent_finished(interrupted=interrupted)


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
        self.limits = limits or Limits()
        self.voices = dict(voices or {})
        self.sessions = sessions or SessionStore()

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

    def start(self, msg: dict[str, Any]) -> Any:
        """The stream for a protocol ``start`` message; raises at once for a bad one."""
        request = protocol.parse_start(msg, self.limits, self.voices)
        sid = protocol.session_id(msg)
        if sid is None:
            if msg.get("continue") or msg.get("more"):
                raise InvalidRequest("'continue' and 'more' need a 'session'")
            return self.engine.stream(request)
        session = self.sessions.get(sid)
        memory = session.memory
        continuing = bool(msg.get("continue")) and memory.agent_speaking
        context = request.context if "context" in msg else memory.context()
        if continuing:  # a later part of an utterance: condition it on the parts already spoken
            current = memory.current_agent_segment()
            context = (*context, current) if current is not None else context
        request = dataclasses.replace(request, context=context, voice=request.voice or session.voice)
        stream = self.engine.stream(request)
        if continuing:
            memory.agent_add_text(request.text)
        else:
            memory.agent_speaker = request.speaker
            memory.agent_started(request.text)
        return SessionStream(stream, memory, more=bool(msg.get("more")))

    async def session(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Apply a protocol ``session`` message; returns the fields of the reply."""
        sid = protocol.session_id(msg)
        if sid is None:
            raise ProtocolError("bad_message", "a session message needs 'session' (the conversation's id)")
        op = msg.get("op")
        if op == "close":
            return {"session": sid, "op": op, "closed": self.sessions.close(sid)}
        session = self.sessions.get(sid)
        if op == "voice":
            session.voice = protocol.parse_voice(msg.get("voice"), self.limits, self.voices)
        elif op == "user_turn":
            text, audio = protocol.parse_turn(msg, self.limits)
            session.memory.add_turn(protocol.int_field(msg, "speaker", 1), text, audio)
        elif op == "end_turn":  # the last part of an utterance sent with "more": it is complete
            session.memory.agent_finished(interrupted=False)
        elif op == "clear":
            session.memory.clear()
        else:
            raise ProtocolError("bad_message", f"unknown session op {op!r}: voice, user_turn, end_turn, clear or close")
        return {"session": sid, "op": op, "turns": len(session.memory.context()), "voice": session.voice is not None}

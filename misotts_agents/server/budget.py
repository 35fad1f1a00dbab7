"""One memory budget for what the server keeps between requests, across every connection and tenant.

Two things outlive a request: sessions (a conversation's voice prompt and its last turns, audio as
24 kHz float32) and audio a client sent with an ``audio_id`` (kept so it need not be sent again).
Both belong to a tenant, and each tenant's are in its own caches (cachetools: sessions in a TTL +
LRU cache bounded in number, audio in an LRU bounded in bytes). Every cache counts bytes, and the
sum over all tenants stays under ``max_bytes``:

when it would not, entries go from the tenant holding the most bytes, its cached audio first (a
client told ``unknown_audio`` sends it again, at the cost of one round trip) and then its least
recently used sessions. A tenant loses entries only while it holds more than every other tenant,
so a tenant flooding the server pushes out its own state, never a smaller tenant's.

A session's size is counted when it changes hands (created, told a turn or a voice, at the end of
each reply); while a reply is being generated its in-progress audio (at most the memory's
``max_turn_s``) is not yet counted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cachetools import LRUCache, TTLCache

from misotts_agents.server.protocol import Limits, ProtocolError


class Sized(Protocol):
    @property
    def nbytes(self) -> int: ...


def _size(value: Sized) -> int:
    return max(1, value.nbytes)


@dataclass
class TenantState:
    """One tenant's sessions and cached audio."""

    sessions: TTLCache[str, Any]
    audio: LRUCache[str, str] = field(default_factory=lambda: LRUCache(1))

    @property
    def nbytes(self) -> int:
        return int(self.sessions.currsize + self.audio.currsize)


class MemoryBudget:
    """Sessions and cached audio of every tenant, within ``max_bytes`` together.

    ``max_sessions`` bounds each tenant's sessions (its least recently used goes first);
    ``session_ttl_s`` forgets sessions idle that long; ``max_audio_bytes`` bounds one tenant's cached
    audio. Thread-safe (the Ray replica's sessions are used from Serve's threads).
    """

    def __init__(
        self,
        max_bytes: int,
        *,
        max_sessions: int = 256,
        session_ttl_s: float = 1800.0,
        max_audio_bytes: int | None = None,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 1 or max_sessions < 1 or session_ttl_s <= 0:
            raise ValueError("max_bytes and max_sessions must be >= 1 and session_ttl_s > 0")
        self.max_bytes = max_bytes
        self.max_sessions = max_sessions
        self.session_ttl_s = session_ttl_s
        self.max_audio_bytes = min(max_audio_bytes or max_bytes, max_bytes)
        self.timer = timer
        self.evicted = 0  # entries pushed out to stay within the budget (not expiry, not the count limit)
        self._tenants: dict[str, TenantState] = {}
        self.lock = threading.RLock()

    @classmethod
    def for_limits(cls, limits: Limits) -> MemoryBudget:
        return cls(
            limits.max_memory_bytes,
            max_sessions=limits.max_sessions_per_tenant,
            session_ttl_s=limits.session_ttl_s,
            max_audio_bytes=limits.max_cached_audio_bytes,
        )

    def tenant(self, name: str) -> TenantState:
        with self.lock:
            state = self._tenants.get(name)
            if state is None:
                # Sized in bytes (getsizeof); the number of sessions is bounded in get_session.
                sessions: TTLCache[str, Any] = TTLCache(
                    self.max_sessions * self.max_bytes, self.session_ttl_s, timer=self.timer, getsizeof=_size
                )
                audio: LRUCache[str, str] = LRUCache(self.max_audio_bytes, getsizeof=len)
                state = self._tenants[name] = TenantState(sessions, audio)
            return state

    # -- sessions -------------------------------------------------------------------------------

    def get_session(self, tenant: str, sid: str, make: Callable[[], Sized] | None = None) -> Any:
        """Tenant's session ``sid`` (its idle time restarts), made with ``make`` when absent (the
        tenant's least recently used session goes if it has ``max_sessions``); None if absent and
        no ``make``."""
        with self.lock:
            sessions = self.tenant(tenant).sessions
            session = sessions.get(sid)
            if session is None:
                if make is None:
                    return None
                sessions.expire()
                while len(sessions) >= self.max_sessions:
                    sessions.popitem()
                session = make()
            self._put(sessions, sid, session)
            return session

    def update_session(self, tenant: str, sid: str) -> None:
        """Count the session's size again (after it changed); its idle time restarts."""
        with self.lock:
            sessions = self.tenant(tenant).sessions
            session = sessions.get(sid)
            if session is not None:
                self._put(sessions, sid, session)

    def close_session(self, tenant: str, sid: str) -> bool:
        with self.lock:
            return self.tenant(tenant).sessions.pop(sid, None) is not None

    def has_session(self, tenant: str, sid: str) -> bool:
        with self.lock:
            return sid in self.tenant(tenant).sessions

    @property
    def sessions(self) -> int:
        with self.lock:
            return sum(len(t.sessions) for t in self._tenants.values())

    # -- audio sent with an id --------------------------------------------------------------------

    def keep_audio(self, tenant: str, audio_id: str, data: str) -> None:
        """Remember ``data`` (base64) under ``audio_id`` for the tenant (too large to fit: not kept)."""
        if len(data) > self.max_audio_bytes:
            return
        with self.lock:
            self._put(self.tenant(tenant).audio, audio_id, data)

    def audio(self, tenant: str, audio_id: str) -> str:
        with self.lock:
            data = self.tenant(tenant).audio.get(audio_id)
        if data is None:
            raise ProtocolError("unknown_audio", f"no audio {audio_id!r} on this server (any more): send it again")
        return data

    # -- the budget -----------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        with self.lock:
            return sum(t.nbytes for t in self._tenants.values())

    def used_by(self, tenant: str) -> int:
        with self.lock:
            state = self._tenants.get(tenant)
            return state.nbytes if state is not None else 0

    def _put(self, cache: Any, key: str, value: Any) -> None:
        cache[key] = value
        self._trim()

    def _trim(self) -> None:
        """Evict, from the tenant holding the most, until the total fits (lock held)."""
        for state in self._tenants.values():
            state.sessions.expire()
        total = sum(t.nbytes for t in self._tenants.values())
        while total > self.max_bytes:
            largest = max(self._tenants.values(), key=lambda t: t.nbytes)
            cache = largest.audio if largest.audio.currsize else largest.sessions
            before = largest.nbytes
            cache.popitem()
            self.evicted += 1
            total -= before - largest.nbytes

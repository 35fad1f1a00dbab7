"""Tenants: who a bearer token belongs to, and what each tenant may use at once.

A server has one token (``MISOTTS_TOKEN``, or a token file with one line) or several, one per
tenant (``MISOTTS_TOKENS="acme:TOKEN,bob:TOKEN"``, or a token file of ``name:token`` lines). Tokens
are kept only as SHA-256 digests and a presented token is compared with every tenant's digest
(``hmac.compare_digest``, no early exit), so neither the time nor the length of the comparison says
anything about a token. Without any token the server is open: every client is the tenant
``default`` (allowed on loopback only, see :func:`check_bind`).

What a tenant owns is out of other tenants' reach: its sessions, its audio ids and its named voices
are looked up under its name (``scope``), and each tenant has its own quota of connections,
concurrent streams, requests waiting for an engine slot and sessions, so one tenant flooding the
server meets its own limits first.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from misotts_agents.connect import TOKEN_ENV  # one token (tenant "default"): what the integrations' client sends
from misotts_agents.server.protocol import Limits, ProtocolError

TOKENS_ENV = "MISOTTS_TOKENS"  # several: "name:token,name:token"
DEFAULT_TENANT = "default"
MIN_TOKEN_CHARS = 16  # beyond loopback: a token someone could guess is no token
TENANT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
LOOPBACK_NAMES = {"localhost", "ip6-localhost"}
_S = TypeVar("_S")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Tenants:
    """The server's tenants by token digest. ``tokens``: tenant name -> token (empty: an open server)."""

    def __init__(self, tokens: Mapping[str, str] | None = None) -> None:
        tokens = dict(tokens or {})
        for name, token in tokens.items():
            if not TENANT_NAME.fullmatch(name):
                raise ValueError(f"tenant name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
            if not token or token != token.strip() or any(c.isspace() for c in token):
                raise ValueError(f"tenant {name!r}: a token is one word without spaces")
        digests = [_digest(t) for t in tokens.values()]
        if len(set(digests)) != len(digests):
            raise ValueError("two tenants have the same token")
        self._digests = dict(zip(tokens, digests, strict=True))
        self._shortest = min((len(t) for t in tokens.values()), default=0)

    @classmethod
    def load(
        cls, token_file: str | Path | None = None, token: str | None = None, env: Mapping[str, str] | None = None
    ) -> Tenants:
        """The tenants of ``token_file`` (``name:token`` lines, or one bare token), else of ``token``,
        else of ``$MISOTTS_TOKENS`` / ``$MISOTTS_TOKEN``; none of them: an open server."""
        env = os.environ if env is None else env
        if token_file is not None:
            return cls(parse_tokens(Path(token_file).read_text(), f"token file {token_file}"))
        if token:
            return cls({DEFAULT_TENANT: token})
        if env.get(TOKENS_ENV):
            return cls(parse_tokens(env[TOKENS_ENV].replace(",", "\n"), f"${TOKENS_ENV}"))
        if env.get(TOKEN_ENV):
            return cls({DEFAULT_TENANT: env[TOKEN_ENV].strip()})
        return cls()

    @property
    def open(self) -> bool:
        """No tokens: every client is the tenant ``default``."""
        return not self._digests

    @property
    def names(self) -> list[str]:
        return list(self._digests) or [DEFAULT_TENANT]

    @property
    def shortest_token(self) -> int:
        return self._shortest

    def authenticate(self, authorization: str | None) -> str | None:
        """The tenant an ``Authorization: Bearer TOKEN`` header belongs to, or None (refused)."""
        if self.open:
            return DEFAULT_TENANT
        scheme, _, given = (authorization or "").partition(" ")
        presented = _digest(given.strip())
        found = None
        for name, digest in self._digests.items():  # every digest, whichever matches: constant time
            if hmac.compare_digest(presented, digest) and scheme.lower() == "bearer":
                found = name
        return found


def parse_tokens(text: str, where: str) -> dict[str, str]:
    """``name:token`` lines (blank lines and ``#`` comments skipped); a single bare token is the
    tenant ``default``'s."""
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if len(lines) == 1 and ":" not in lines[0]:
        return {DEFAULT_TENANT: lines[0]}
    tokens: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        name, sep, token = line.partition(":")
        if not sep or not name.strip() or not token.strip():
            raise ValueError(f"{where}, entry {n}: expected name:token")
        if name.strip() in tokens:
            raise ValueError(f"{where}: tenant {name.strip()!r} appears twice")
        tokens[name.strip()] = token.strip()
    if not tokens:
        raise ValueError(f"{where}: no tokens in it")
    return tokens


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, tenants: Tenants) -> None:
    """Refuse to expose the engine beyond this machine without tokens, or with guessable ones."""
    if is_loopback(host):
        return
    if tenants.open:
        raise SystemExit(
            f"error: refusing to listen on {host!r} (not loopback) without a token: anyone who can reach it "
            f"could use the GPU. Set ${TOKEN_ENV} (clients send 'Authorization: Bearer TOKEN'), or "
            "--token-file FILE, or bind 127.0.0.1."
        )
    if tenants.shortest_token < MIN_TOKEN_CHARS:
        raise SystemExit(
            f"error: refusing to listen on {host!r} with a token shorter than {MIN_TOKEN_CHARS} characters; "
            "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )


# -- what belongs to a tenant -----------------------------------------------------------------------


def scope(tenant: str, name: str) -> str:
    """``name`` (a session id) as the backend knows it: inside the tenant's namespace."""
    return f"{tenant}/{name}"


def scoped_voice(voices: Mapping[str, object] | None, tenant: str, name: str) -> str:
    """The backend's key of a named voice a client asks for: the tenant's own (``tenant/name``)
    before the shared one; another tenant's is out of reach (a client name has no ``/``)."""
    if "/" in name:
        raise ProtocolError("invalid_request", f"unknown voice {name!r}")
    own = scope(tenant, name)
    return own if own in (voices or {}) else name


def private_session(tenant: str) -> str:
    """A one-request session (incremental text without a session); ``~`` marks it private."""
    return f"~{tenant}/{uuid.uuid4().hex}"


def unscope(scoped: str) -> tuple[str, str]:
    """(tenant, name) of a scoped session id; an unscoped id (a backend used directly) is the
    tenant ``default``'s."""
    tenant, sep, name = scoped.removeprefix("~").partition("/")
    return (tenant, name) if sep else (DEFAULT_TENANT, scoped)


@dataclass(frozen=True)
class Quota:
    """What is open at once: connections and streams, per tenant and for the whole server."""

    connections: int
    streams: int


class Quotas:
    """Counts connections, streams and waiting requests per tenant against the limits (the event
    loop's thread and Starlette's, hence the lock); refusals are ``too_many`` errors (retryable)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._connections: Counter[str] = Counter()
        self._streams: Counter[str] = Counter()
        self._waiting: dict[str, list[Any]] = {}  # streams that were still queued when last looked at
        self._lock = threading.Lock()

    def connect(self, tenant: str) -> None:
        lim = self.limits
        with self._lock:
            if self._connections.total() >= lim.max_connections:
                raise ProtocolError("too_many", f"the server has its {lim.max_connections} connections open")
            if self._connections[tenant] >= lim.max_connections_per_tenant:
                raise ProtocolError("too_many", f"at most {lim.max_connections_per_tenant} connections per tenant")
            self._connections[tenant] += 1

    def disconnect(self, tenant: str) -> None:
        with self._lock:
            self._connections[tenant] -= 1
            if self._connections[tenant] <= 0:
                del self._connections[tenant]

    def start_stream(self, tenant: str) -> None:
        with self._lock:
            if self._streams[tenant] >= self.limits.max_streams_per_tenant:
                raise ProtocolError(
                    "too_many", f"at most {self.limits.max_streams_per_tenant} concurrent streams per tenant"
                )
            self._streams[tenant] += 1

    def end_stream(self, tenant: str) -> None:
        with self._lock:
            self._streams[tenant] -= 1
            if self._streams[tenant] <= 0:
                del self._streams[tenant]

    def start_waiting(self, tenant: str, start: Callable[[], _S]) -> _S:
        """``start()`` (a backend's stream) unless the tenant has ``max_waiting_per_tenant`` requests
        still waiting for an engine slot. A stream counts while its ``queued`` is true: the ones
        admitted or over since the last look are dropped here, so no task watches them."""
        with self._lock:
            waiting = [s for s in self._waiting.get(tenant, ()) if getattr(s, "queued", False)]
            if len(waiting) >= self.limits.max_waiting_per_tenant:
                self._waiting[tenant] = waiting
                raise ProtocolError(
                    "too_many", f"at most {self.limits.max_waiting_per_tenant} waiting requests per tenant"
                )
            stream = start()
            self._waiting[tenant] = [*waiting, stream]
            return stream

    def usage(self, tenant: str) -> Quota:
        with self._lock:
            return Quota(self._connections[tenant], self._streams[tenant])

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections.total()

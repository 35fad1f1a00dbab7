"""Exceptions the engine raises, so callers (and the framework integrations) can map them cleanly,
and the one table that carries them across a process boundary.

Errors cross boundaries as a short ``code`` and a message: the server's WebSocket and HTTP answers,
the server's client (:class:`~misotts_agents.server.RemoteEngine`), the Ray Serve replicas and
ingress, and the LiveKit inference process all use :func:`to_wire` on the sending side and
:func:`from_wire` on the receiving side, so a refused request raises the same class in process,
through a server, through Ray and through LiveKit's inference process.
"""

from __future__ import annotations

from dataclasses import dataclass


class MisoError(Exception):
    """Base class for every error misotts-agents raises on purpose."""


class ModelSourceError(MisoError, FileNotFoundError):
    """A model, tokenizer, codec or watermark source could not be found or downloaded."""


class CheckpointError(MisoError, ValueError):
    """A checkpoint file exists but does not match the model it should fill (keys, shapes, format)."""


class InvalidRequest(MisoError, ValueError):
    """The request itself is bad: empty or too long text, unusable audio, bad sampling parameters."""


class EngineBusy(MisoError):
    """Every slot is busy and the waiting queue is full: retry later or add capacity."""


class EngineClosed(MisoError):
    """The engine was closed; it takes no more requests and ends those still running."""


class RemoteError(MisoError):
    """An error reported from across a process boundary with no closer class here (``code`` says
    what it was: ``internal``, ``bad_message``...), or a failed connection to the server."""

    def __init__(self, message: str, code: str = "internal") -> None:
        super().__init__(message)
        self.code = code

    @property
    def retryable(self) -> bool:
        return WIRE_CODES[self.code].retryable if self.code in WIRE_CODES else False


@dataclass(frozen=True)
class WireCode:
    """What one error code means on the receiving side: the exception raised, whether the same
    request may succeed if sent again, and the HTTP status the server answers with."""

    exception: type[MisoError]
    retryable: bool
    http_status: int


# The one table. For an exception, the first row whose class it is an instance of gives its code
# (an exception that already carries a code of this table, as ProtocolError and RemoteError do,
# keeps it); for a code, its row gives the exception to raise. See server/protocol.py for when the
# server sends each code.
WIRE_CODES: dict[str, WireCode] = {
    "invalid_request": WireCode(InvalidRequest, retryable=False, http_status=400),
    "busy": WireCode(EngineBusy, retryable=True, http_status=503),  # every slot and the queue are full
    "closed": WireCode(EngineClosed, retryable=False, http_status=503),
    "unavailable": WireCode(ModelSourceError, retryable=False, http_status=503),  # no engine, or no watermark
    "too_large": WireCode(InvalidRequest, retryable=False, http_status=400),
    "too_many": WireCode(EngineBusy, retryable=True, http_status=429),  # a per-connection limit
    "bad_json": WireCode(RemoteError, retryable=False, http_status=400),
    "bad_message": WireCode(RemoteError, retryable=False, http_status=400),
    "unknown_type": WireCode(RemoteError, retryable=False, http_status=400),
    "duplicate_id": WireCode(RemoteError, retryable=False, http_status=400),
    "unknown_audio": WireCode(RemoteError, retryable=True, http_status=400),  # the client sends it again
    "internal": WireCode(RemoteError, retryable=True, http_status=500),
    # Raised by the client itself, never sent by the server:
    "connection": WireCode(RemoteError, retryable=True, http_status=502),  # unreachable or dropped
    "unauthorized": WireCode(RemoteError, retryable=False, http_status=401),  # the server refused the token
}


def error_code(exc: BaseException) -> str:
    """The wire code of ``exc``: its own (ProtocolError, RemoteError), its class's row, ``invalid_request``
    for any other MisoError (an error raised on purpose is about the request), else ``internal``."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code in WIRE_CODES:
        return code
    for code, row in WIRE_CODES.items():
        if row.exception is not RemoteError and isinstance(exc, row.exception):
            return code
    return "invalid_request" if isinstance(exc, MisoError) else "internal"


def to_wire(exc: BaseException) -> tuple[str, str, bool]:
    """``exc`` as ``(code, message, retryable)``; an unexpected exception's message names its type."""
    code = error_code(exc)
    message = str(exc) if code != "internal" or isinstance(exc, MisoError) else f"{type(exc).__name__}: {exc}"
    return code, message, WIRE_CODES[code].retryable


def from_wire(code: str, message: str) -> MisoError:
    """The exception to raise for an error that came as ``code`` and ``message``. It keeps ``code``
    (``exc.code``), so passing it on (the Ray ingress) sends the same code again."""
    row = WIRE_CODES.get(code)
    if row is None or row.exception is RemoteError:  # an unknown code (a newer server) is kept as it came
        return RemoteError(message, code)
    exc = row.exception(message)
    exc.code = code  # type: ignore[attr-defined]
    return exc


def http_status(exc: BaseException) -> int:
    """The HTTP status the server answers ``exc`` with."""
    return WIRE_CODES[error_code(exc)].http_status

"""The one error table: every code survives a hop (server -> client, replica -> Ray ingress ->
client, inference process -> job) as the same exception class and the same code."""

from __future__ import annotations

import pytest

from misotts_agents.errors import (
    WIRE_CODES,
    CheckpointError,
    EngineBusy,
    EngineClosed,
    InvalidRequest,
    MisoError,
    ModelSourceError,
    RemoteError,
    error_code,
    from_wire,
    http_status,
    to_wire,
)
from misotts_agents.server.protocol import ProtocolError, exception_message


@pytest.mark.parametrize("code", sorted(WIRE_CODES))
def test_every_code_round_trips(code):
    exc = from_wire(code, "what happened")
    assert isinstance(exc, WIRE_CODES[code].exception)
    assert str(exc) == "what happened"
    assert to_wire(exc) == (code, "what happened", WIRE_CODES[code].retryable)  # a second hop keeps it
    assert http_status(exc) == WIRE_CODES[code].http_status


@pytest.mark.parametrize(
    ("exc", "code", "cls", "retryable", "status"),
    [
        (InvalidRequest("empty text"), "invalid_request", InvalidRequest, False, 400),
        (EngineBusy("full"), "busy", EngineBusy, True, 503),
        (EngineClosed("closed"), "closed", EngineClosed, False, 503),
        (ModelSourceError("no watermark"), "unavailable", ModelSourceError, False, 503),
        (CheckpointError("bad key"), "invalid_request", InvalidRequest, False, 400),  # any other MisoError
        (ProtocolError("too_large", "text too long"), "too_large", InvalidRequest, False, 400),
        (ProtocolError("too_many", "8 at most"), "too_many", EngineBusy, True, 429),
        (ProtocolError("duplicate_id", "running"), "duplicate_id", RemoteError, False, 400),
    ],
)
def test_exceptions_map_to_codes_and_back(exc, code, cls, retryable, status):
    assert error_code(exc) == code
    assert http_status(exc) == status
    sent = to_wire(exc)
    assert sent == (code, str(exc), retryable)
    back = from_wire(*sent[:2])
    assert type(back) is cls
    assert error_code(back) == code


def test_unexpected_exceptions_are_internal_and_named():
    code, message, retryable = to_wire(RuntimeError("CUDA error: out of memory"))
    assert (code, message, retryable) == ("internal", "RuntimeError: CUDA error: out of memory", True)
    back = from_wire(code, message)
    assert isinstance(back, RemoteError)
    assert back.code == "internal"
    assert back.retryable
    assert to_wire(back) == (code, message, True)  # passed on unchanged, not renamed twice


def test_unknown_codes_are_kept():
    back = from_wire("new_in_a_later_server", "something")
    assert isinstance(back, RemoteError)
    assert isinstance(back, MisoError)
    assert back.code == "new_in_a_later_server"
    assert not back.retryable


def test_error_messages_carry_retryable():
    import json

    sent = json.loads(exception_message(EngineBusy("full"), "r1"))
    assert sent == {"type": "error", "id": "r1", "code": "busy", "message": "full", "retryable": True}

"""Refusing a message costs bounded time and memory whatever the shape of its JSON (jsonshape.py).

Each worst shape (misotts_agents/testing/json_shapes.py) fills the size limit (6 MiB), through the
WebSocket parser and the HTTP body's alike. Before: 6 MiB of distinct keys took 2.5 s and 480 MB,
6 MiB of numbers in ``context`` 29 s and 3.9 GB. The budget: 50 ms of CPU and 20 MB of Python
memory (tracemalloc's peak), both well above what each shape takes here, so other work on the
machine does not make them flaky; benchmarks/message_cost.py prints the figures.
"""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest

from misotts_agents.server import schema
from misotts_agents.server.jsonshape import MAX_ITEMS, MAX_KEYS
from misotts_agents.server.protocol import Limits, ProtocolError
from misotts_agents.testing.json_shapes import worst_shapes

LIMITS = Limits()
CPU_BUDGET_S = 0.050
MEMORY_BUDGET = 20 * 1024 * 1024
CASES = worst_shapes()


def refuse(raw: str | bytes) -> ProtocolError:
    """The refusal of ``raw``: a WebSocket message (text) or a speech body (bytes)."""
    parse = schema.parse_message if isinstance(raw, str) else schema.parse_speech_body
    with pytest.raises(ProtocolError) as refused:
        parse(raw, LIMITS)  # pyright: ignore[reportArgumentType]  (text with the one, bytes with the other)
    return refused.value


@pytest.mark.parametrize(("endpoint", "shape", "build"), CASES, ids=[f"{e}: {s}" for e, s, _ in CASES])
def test_refusing_any_shape_costs_bounded_time_and_memory(endpoint, shape, build):
    raw = build()
    assert len(raw.encode() if isinstance(raw, str) else raw) <= LIMITS.max_message_bytes
    started = time.process_time()
    code = refuse(raw).code
    cpu_s = time.process_time() - started
    tracemalloc.start()
    try:
        error = refuse(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert error.code == code in ("too_large", "bad_json", "invalid_request", "unknown_type", "bad_message")
    assert len(error.message) < 1_000  # the error never repeats the input back
    assert cpu_s <= CPU_BUDGET_S, f"{shape}: {cpu_s * 1000:.0f} ms of CPU"
    assert peak <= MEMORY_BUDGET, f"{shape}: {peak / 2**20:.1f} MB"


def test_the_largest_valid_messages_still_pass():
    """The value count never refuses a valid message: every text all commas, every context segment
    used, and a start whose audio fills the size limit."""
    commas = "," * LIMITS.max_text_chars
    item = {"speaker": 1, "text": commas, "audio_b64": "AAAA"}
    msg = {"type": "start", "id": "r", "text": commas, "context": [item] * LIMITS.max_context_segments}
    msg["voice"] = item
    assert isinstance(schema.parse_message(json.dumps(msg, separators=(",", ":")), LIMITS), schema.Start)
    audio = "A" * (LIMITS.max_message_bytes - 200)
    big = {"type": "start", "id": "r", "text": "Hi.", "context": [{"text": "Hm.", "audio_b64": audio}]}
    assert isinstance(schema.parse_message(json.dumps(big), LIMITS), schema.Start)


def test_no_model_has_more_fields_than_the_shape_check_allows():
    for model in (*schema.MESSAGES.values(), schema.SpeechBody, schema.VoiceItem, schema.Chunks):
        assert len(model.model_fields) < MAX_KEYS, model.__name__
    assert LIMITS.max_context_segments < MAX_ITEMS  # a list just over the limit gets the limit's message

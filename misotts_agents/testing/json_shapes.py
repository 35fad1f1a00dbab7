"""The worst shapes of JSON a client can send within the size limit, for measuring what refusing
each costs (tests/test_server_cost.py asserts a budget, benchmarks/message_cost.py prints figures).

Each shape fills the message limit (6 MiB by default) and goes into the fields of a WebSocket
``start`` or of the OpenAI speech body: many distinct or duplicate keys, deep nesting, long arrays
where a string or a short list is expected, huge numbers, long strings in unexpected places, and
the widest tree the shape check (server/jsonshape.py) lets through; "at the count": just under the
number of JSON values the server counts before parsing.
"""

from __future__ import annotations

from collections.abc import Callable

from misotts_agents.server.jsonshape import MAX_ITEMS, MAX_KEYS, max_values
from misotts_agents.server.protocol import Limits

LIMITS = Limits()
SIZE = LIMITS.max_message_bytes - 256  # each shape fills the limit, its head and tail included
VALUES = max_values(LIMITS) - 64  # shapes "at the count": just under what the count lets through

# The fields a shape goes into: a WebSocket start's, or the OpenAI body's.
WS = {"head": '{"type":"start","id":"r"', "text": "text", "list": "context", "number": "temperature"}
HTTP = {"head": '{"input":"Hi"', "text": "input", "list": "voice", "number": "speed"}


def repeat(head: str, unit: Callable[[int], str], tail: str, count: int | None = None, fill: str = "x") -> str:
    """``head`` + units + ``tail``: ``count`` units (or as many as fill SIZE), each one's ``PAD``
    replaced by as many ``fill`` characters as make them fill SIZE together."""
    count = count or (SIZE - len(head) - len(tail)) // len(unit(0))
    pad = fill * max(0, (SIZE - len(head) - len(tail)) // count - len(unit(0)) + 3)
    if unit(0) == unit(1):  # the same unit throughout
        return head + unit(0).replace("PAD", pad) * count + tail
    return head + "".join(unit(i).replace("PAD", pad) for i in range(count)) + tail


def shapes(f: dict[str, str]) -> dict[str, Callable[[], str]]:
    """The worst shapes for the fields ``f``, each built when called."""
    h, text, lst, num = f["head"], f["text"], f["list"], f["number"]
    pair = VALUES // 2  # a key and its value: two marks
    return {
        "distinct keys": lambda: repeat(h, lambda i: f',"k{i:07d}":0', "}"),
        "distinct long keys, at the count": lambda: repeat(h, lambda i: f',"k{i:07d}PAD":0', "}", pair),
        "duplicate keys": lambda: repeat(h, lambda i: ',"a":0', "}"),
        "duplicate long keys, at the count": lambda: repeat(h, lambda i: ',"aPAD":0', "}", pair),
        "nested lists": lambda: h + f',"{text}":' + "[" * (SIZE // 2) + "]" * (SIZE // 2) + "}",
        "nested objects": lambda: h + f',"{text}":' + '{"a":' * (SIZE // 6) + "1" + "}" * (SIZE // 6),
        "nested lists, at the count": lambda: h + f',"{text}":' + "[" * (VALUES - 8) + "]" * (VALUES - 8) + "}",
        "numbers for a string": lambda: repeat(h + f',"{text}":[', lambda i: "0,", "0]}"),
        "long numbers for a string, at the count": lambda: repeat(
            h + f',"{text}":[', lambda i: "1PAD,", "0]}", VALUES, "0"
        ),
        "numbers for a short list": lambda: repeat(h + f',"{lst}":[', lambda i: "0,", "0]}"),
        "long numbers for a short list, at the count": lambda: repeat(
            h + f',"{lst}":[', lambda i: "1PAD,", "0]}", VALUES, "0"
        ),
        "objects for a short list": lambda: repeat(h + f',"{lst}":[', lambda i: "{},", "{}]}"),
        "strings for a short list, at the count": lambda: repeat(h + f',"{lst}":[', lambda i: '"PAD",', '""]}', VALUES),
        "widest tree the shape check allows": lambda: h + f',"{lst}":[' + ",".join([wide_item()] * MAX_ITEMS) + "]}",
        "1e999999": lambda: h + f',"{num}":1e999999}}',
        "10**100000": lambda: h + f',"{num}":1{"0" * 100_000}}}',
        "a number of 6 MiB": lambda: repeat(h + f',"{num}":1', lambda i: "0", "}"),
        "a long string for a number": lambda: repeat(h + f',"{num}":"', lambda i: "x", '"}'),
        "a long id": lambda: repeat('{"type":"start","id":"', lambda i: "x", '"}'),
        "a long type": lambda: repeat('{"type":"', lambda i: "x", '"}'),
        "a long key": lambda: repeat(h + ',"', lambda i: "x", '":0}'),
        "a long non-ASCII key": lambda: repeat(h + ',"', lambda i: "\U0001f600", '":0}', SIZE // 4),
        "a long text": lambda: repeat(h + f',"{text}":"', lambda i: "x", '"}'),
        "a long voice name": lambda: repeat(h + ',"voice":"', lambda i: "x", '"}'),
    }


def wide_item() -> str:
    """One list item with MAX_KEYS unknown keys, its values filling its share of SIZE."""
    value = "x" * (SIZE // (MAX_ITEMS * MAX_KEYS) - 16)
    return "{" + ",".join(f'"k{k}":"{value}"' for k in range(MAX_KEYS)) + "}"


def worst_shapes() -> list[tuple[str, str, Callable[[], str | bytes]]]:
    """(endpoint, shape, build) for each shape: ``ws`` builds the text of a WebSocket message,
    ``http`` the bytes of a speech body."""
    cases: list[tuple[str, str, Callable[[], str | bytes]]] = [("ws", n, b) for n, b in shapes(WS).items()]
    return cases + [("http", name, _encoded(build)) for name, build in shapes(HTTP).items()]


def _encoded(build: Callable[[], str]) -> Callable[[], bytes]:
    return lambda: build().encode()

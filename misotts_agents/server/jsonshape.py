"""Raw JSON from a client, parsed at a cost bounded by the message, whatever its shape.

A message under the size limit can still be costly to refuse: 6 MiB of ``[0,0,...`` is three
million values, and a validator that reports one error per unknown key or per wrong list item
builds (and materialises) millions of errors, seconds of the event loop and gigabytes. So before
anything is parsed, the values are counted from the raw text at C speed (every value or key but the
first follows one of ``, : [ {``, so their count bounds them); only then is the text parsed, and
the parsed tree is walked once, stopping at the first object with more keys (or a longer key), list
with more items, or nesting deeper than any message of the protocol has. The validator then meets
at most a few thousand values and reports a bounded number of errors (schema.py).

The parser is ``json.loads`` on text: its strings are slices of the message (pydantic-core's
re-decode a non-ASCII string from UTF-8, six times the string's size at the peak). A body arrives
as bytes and is decoded strictly, in pieces, for the same reason. Lone surrogates (``"\\ud800"``)
parse; every string the server uses is checked for them (schema.py).
"""

from __future__ import annotations

import codecs
import json
from typing import Any

from misotts_agents.server.protocol import Limits, ProtocolError

#: Keys of one object: more than any model of the schema has (tests/test_server_cost.py checks).
MAX_KEYS = 64
#: Items of one list: more than any list the protocol takes (``context``: ``max_context_segments``),
#: so a list just over a schema limit still gets that limit's own message.
MAX_ITEMS = 64
#: Nesting: a start's context item's fields are at depth 3.
MAX_DEPTH = 8
#: Characters of one key: more than any field name has.
MAX_KEY_CHARS = 64
#: Values of a message beyond those its texts may hold (each character of a text counts at most once).
FIELD_VALUES = 4_096
_MARKS = ",:[{"
_DECODE_PIECE = 64 * 1024


def max_values(limits: Limits) -> int:
    """The most JSON values (keys included) a valid message has: its texts (a start's own, its
    context's and its voice's) may each be all commas, and the fields themselves are far fewer."""
    return limits.max_text_chars * (limits.max_context_segments + 2) + FIELD_VALUES


def load_json(raw: str | bytes, limits: Limits) -> Any:
    """``raw`` parsed, size- and count-checked first, its shape checked after (raises ProtocolError:
    ``too_large`` for a size or count, ``bad_json``, ``invalid_request`` for a shape no message has)."""
    limit = limits.max_message_bytes
    if len(raw) > limit:
        raise ProtocolError("too_large", f"message too large: {len(raw)} bytes (at most {limit})")
    text = raw if isinstance(raw, str) else _decoded(raw)
    if sum(text.count(mark) for mark in _MARKS) > max_values(limits):
        raise ProtocolError("too_large", f"message has too many JSON values (at most {max_values(limits)})")
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ProtocolError("bad_json", "not valid JSON: nested too deep") from None
    except ValueError as exc:  # JSONDecodeError, an integer of over 4300 digits, NaN / Infinity
        raise ProtocolError("bad_json", f"not valid JSON: {str(exc)[:200]}") from None
    check_shape(data)
    return data


def _decoded(raw: bytes) -> str:
    """Strict UTF-8, decoded in pieces: decoding all at once peaks at five times the text's size."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(raw)
    try:
        pieces = [decoder.decode(view[i : i + _DECODE_PIECE]) for i in range(0, len(raw), _DECODE_PIECE)]
        pieces.append(decoder.decode(b"", final=True))
    except UnicodeDecodeError as exc:
        raise ProtocolError("bad_json", f"not valid UTF-8 at byte {exc.start}") from None
    return "".join(pieces)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def check_shape(data: Any) -> None:
    """Refuse at the first object over MAX_KEYS keys (or with a key over MAX_KEY_CHARS), list over
    MAX_ITEMS items, or nesting past MAX_DEPTH: no message of the protocol has one. Visits each
    value once, iteratively."""
    pending: list[tuple[Any, int]] = [(data, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict):
            children = value.values()
            if len(value) > MAX_KEYS:
                raise ProtocolError("invalid_request", f"an object has {len(value)} keys (at most {MAX_KEYS})")
            if any(len(key) > MAX_KEY_CHARS for key in value):
                raise ProtocolError("invalid_request", f"a key is over {MAX_KEY_CHARS} characters (no field name is)")
        elif isinstance(value, list):
            children = value
            if len(value) > MAX_ITEMS:
                raise ProtocolError("too_large", f"a list has {len(value)} items (at most {MAX_ITEMS})")
        else:
            continue
        if depth >= MAX_DEPTH:
            raise ProtocolError("invalid_request", f"nested deeper than {MAX_DEPTH} levels (no message is)")
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))

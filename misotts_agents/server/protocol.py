"""The wire protocol of ``misotts-agents serve`` (WebSocket ``/v1/stream``), shared by server and client.

Control messages are JSON text frames; audio travels in binary frames.

Client -> server
----------------

``{"type": "start", "id": "r1", "text": "...", ...}``
    Start an utterance. ``id`` is the client's name for it (a non-empty string of at most 128
    UTF-8 bytes, unique among the connection's running requests). Optional fields:
    ``speaker`` (int, default 0), ``temperature`` (0.9), ``topk`` (50), ``seed`` (int; default random,
    reported in the end stats), ``max_audio_ms`` (90000), ``max_ahead_s`` (pacing, default none),
    ``watermark`` (false opts out where the server allows it; default: the server's setting),
    ``chunks`` (``{"first_frames", "growth", "max_frames"}``), ``codes`` (true: the end message also
    carries the sampled codes), ``context`` (earlier turns, oldest first:
    ``[{"speaker": 1, "text": "...", "audio_b64": "..."}]``) and ``voice``
    (``{"speaker": 0, "text": "...", "audio_b64": "..."}``, or the name of one of the server's voices).
    Audio is base64 of int16 little-endian PCM, 24 kHz mono.

    Audio sent once need not be sent again on the same connection: a context item or voice object
    with an ``audio_id`` (a string of at most 128 bytes) and its ``audio_b64`` is remembered under that
    id; later ones may give the ``audio_id`` alone. The server keeps the most recently used audio up
    to a size limit; an id it no longer has is answered with the error ``unknown_audio``, and the
    client sends the start again with the audio.

    ``session`` (a string of at most 128 bytes) names the conversation: the server keeps its voice
    and turn memory (see ``session`` below). A start with a session and no ``context`` is conditioned
    on the session's last turns, uses the session's voice unless it names its own, and its audio
    becomes the session's next agent turn (cut where it was cancelled). ``"continue": true`` makes
    it a later part of the session's agent turn in progress (conditioned on the parts before it);
    ``"more": true`` leaves that turn open for further parts (close it with ``end_turn``).

    ``"incremental": true``: the text arrives in pieces (``text`` may be empty); the server speaks it
    sentence by sentence as sentences complete, one audio stream under the one id.
``{"type": "append", "id": "r1", "text": "...", "flush": false}``
    More text for an incremental request. ``flush`` speaks what has arrived without waiting for the
    end of the sentence.
``{"type": "end", "id": "r1"}``
    No more text for an incremental request; what remains is spoken, then its ``end`` message comes.
``{"type": "cancel", "id": "r1"}``
    Stop a running request; its engine slot is freed at the next frame step. The server answers with
    the request's ``end`` message (``stats.stop_reason == "cancelled"``). Cancelling an unknown or
    finished id is not an error (it is ignored).
``{"type": "session", "session": "c1", "op": "..."}``
    Change a session (created on first use; forgotten after 30 idle minutes). ``op``: ``voice``
    (``"voice"``: a voice object or name, or null to drop it), ``user_turn`` (``speaker`` default 1,
    ``text``, ``audio_b64``: what the user said and how it sounded), ``end_turn`` (the agent turn built
    with ``more`` is complete; ``"interrupted": true`` keeps only what was heard by now), ``clear``
    (forget the turns) or ``close``. Answered with ``{"type": "session", "session", "op", "turns",
    "voice"}`` (``closed`` for close).
``{"type": "ping"}``
    Answered with ``{"type": "pong"}``.

Server -> client
----------------

Binary audio frame (one per streamed chunk, in order for each id; chunks of concurrent requests
interleave)::

    uint16 LE  n            length of the id in bytes
    n bytes    id           UTF-8
    uint32 LE  start_frame  first 80 ms frame of the chunk within the utterance
    uint32 LE  frames       frames in the chunk (PCM samples = frames * 1920)
    uint8      flags        bit 0: final (the utterance ended by itself with this chunk)
    rest       PCM          int16 little-endian, 24 kHz mono

``{"type": "end", "id": "r1", "stats": {...}}``
    The request is over (finished, hit a limit, or cancelled): ``stats`` holds ``seed``, ``frames``,
    ``stop_reason`` (eos | max_frames | context_full | cancelled; ``empty`` for an incremental request
    that got no text), ``prompt_frames``, ``dropped_segments``, ``time_to_first_audio_s``,
    ``elapsed_s``, ``real_time_factor``, ``parts`` (requests spoken: more than 1 for incremental
    text); plus ``codes`` (list of frames of K ints) when the start asked for them. The ``final`` flag
    of an incremental request's audio is set only when its end came before its last sentence started:
    the ``end`` message is what says a request is over.
``{"type": "error", "id": "r1" | null, "code": "...", "message": "...", "retryable": false}``
    The request failed (or, with ``id`` null, a message could not be understood). After an error for
    an id, nothing more comes for it. Codes: ``bad_json``, ``bad_message``, ``unknown_type``,
    ``too_large``, ``invalid_request``, ``unknown_audio``, ``duplicate_id``, ``too_many`` (per
    connection limit: requests or sessions), ``busy`` (engine queue full), ``closed`` (engine closed),
    ``unavailable`` (the engine lacks what the request needs, e.g. a watermark), ``internal``.
    ``retryable``: whether the same message may succeed if sent again (busy, too_many, unknown_audio
    with the audio, internal). The codes, their exceptions and HTTP statuses are one table:
    ``misotts_agents.errors.WIRE_CODES``. The connection stays open after every error.

Authentication: with a server token, the WebSocket handshake must carry ``Authorization: Bearer
<token>``; otherwise the server accepts and at once closes with code 1008 (policy violation).
A message larger than the server's WebSocket ``max_size`` closes that connection (code 1009);
smaller but still over the request limits is answered with an ``error`` (``too_large``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from misotts_agents.audio import from_int16, to_int16, to_mono
from misotts_agents.engine.request import ChunkSchedule, Segment, SynthesisRequest
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.errors import WIRE_CODES, InvalidRequest, to_wire
from misotts_agents.model.config import NUM_CODEBOOKS

MAX_ID_BYTES = 128
_TAIL = struct.Struct("<IIB")
_LEN = struct.Struct("<H")
FLAG_FINAL = 1


@dataclass(frozen=True)
class Limits:
    """What one client may ask of the server."""

    max_text_chars: int = 4_000  # one utterance
    # base64 audio one start may use (context + voice, including audio referenced by id): about what
    # the model's 2048-frame context can hold (2048 * 1920 samples of int16), ~160 s.
    max_audio_b64_bytes: int = 11 * 1024 * 1024
    max_cached_audio_bytes: int = 16 * 1024 * 1024  # audio a connection may refer to by id (LRU)
    max_message_bytes: int = 6 * 1024 * 1024  # one JSON message (checked by the app)
    ws_max_size: int = 8 * 1024 * 1024  # the transport limit: larger frames close the connection
    max_concurrent_per_connection: int = 8
    max_sessions_per_connection: int = 16
    max_context_segments: int = 16


class ProtocolError(Exception):
    """A message the server refuses; ``code`` is one of the protocol's error codes."""

    def __init__(self, code: str, message: str, rid: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.rid = rid


# -- binary audio frames ----------------------------------------------------------------------


def pack_audio(rid: str, start_frame: int, frames: int, final: bool, pcm16: bytes) -> bytes:
    raw = rid.encode()
    return _LEN.pack(len(raw)) + raw + _TAIL.pack(start_frame, frames, FLAG_FINAL if final else 0) + pcm16


def unpack_audio(data: bytes) -> tuple[str, int, int, bool, memoryview]:
    view = memoryview(data)
    (n,) = _LEN.unpack_from(view, 0)
    rid = bytes(view[2 : 2 + n]).decode()
    start_frame, frames, flags = _TAIL.unpack_from(view, 2 + n)
    return rid, start_frame, frames, bool(flags & FLAG_FINAL), view[2 + n + _TAIL.size :]


def audio_to_b64(audio: np.ndarray) -> str:
    return base64.b64encode(to_int16(np.asarray(audio, dtype=np.float32))).decode()


class AudioStore:
    """One connection's audio by ``audio_id`` (see the start message), least recently used out first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._items: OrderedDict[str, str] = OrderedDict()

    def resolve(self, msg: dict[str, Any]) -> dict[str, Any]:
        """``msg`` with every referenced audio filled in; newly sent audio with an id is remembered."""
        if not isinstance(msg.get("context"), list) and not isinstance(msg.get("voice"), dict):
            return msg
        msg = dict(msg)
        if isinstance(msg.get("context"), list):
            msg["context"] = [self._item(item) for item in msg["context"]]
        if isinstance(msg.get("voice"), dict):
            msg["voice"] = self._item(msg["voice"])
        return msg

    def _item(self, item: Any) -> Any:
        if not isinstance(item, dict) or "audio_id" not in item:
            return item
        aid = name_field(item, "audio_id")
        if aid is None:
            raise ProtocolError("bad_message", "'audio_id' must be a non-empty string")
        data = item.get("audio_b64")
        if isinstance(data, str) and data:
            if aid in self._items:
                self.size -= len(self._items.pop(aid))
            self._items[aid] = data
            self.size += len(data)
            while self.size > self.max_bytes and len(self._items) > 1:
                self.size -= len(self._items.popitem(last=False)[1])
            return item
        data = self._items.get(aid)
        if data is None:
            raise ProtocolError("unknown_audio", f"no audio {aid!r} on this connection (any more): send it again")
        self._items.move_to_end(aid)
        return {**item, "audio_b64": data}


# -- messages ---------------------------------------------------------------------------------


def message(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


def error_message(code: str, text: str, rid: str | None = None) -> str:
    retryable = WIRE_CODES[code].retryable if code in WIRE_CODES else False
    return message("error", id=rid, code=code, message=text, retryable=retryable)


def exception_message(exc: BaseException, rid: str | None = None) -> str:
    """The ``error`` message for ``exc`` (its code from the one table in errors.py)."""
    code, text, _ = to_wire(exc)
    return error_message(code, text, rid)


def parse_json(text: str, limits: Limits) -> dict[str, Any]:
    if len(text) > limits.max_message_bytes:
        raise ProtocolError("too_large", f"message too large: {len(text)} bytes (at most {limits.max_message_bytes})")
    try:
        msg = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError("bad_json", f"message is not valid JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_message", "a message is a JSON object with a 'type'")
    return msg


def name_field(msg: dict[str, Any], key: str) -> str | None:
    """A client-chosen name (request ``id``, ``session``, ``audio_id``): absent, or a non-empty
    string of at most MAX_ID_BYTES UTF-8 bytes."""
    value = msg.get(key)
    if value is not None and (not isinstance(value, str) or not value or len(value.encode()) > MAX_ID_BYTES):
        raise ProtocolError("bad_message", f"'{key}' must be a non-empty string of at most {MAX_ID_BYTES} bytes")
    return value


def request_id(msg: dict[str, Any]) -> str:
    rid = name_field(msg, "id")
    if rid is None:
        raise ProtocolError("bad_message", f"'id' (a string of at most {MAX_ID_BYTES} bytes) is required")
    return rid


def _audio(item: dict[str, Any], what: str, budget: list[int]) -> np.ndarray:
    data = item.get("audio_b64")
    if not isinstance(data, str) or not data:
        raise InvalidRequest(f"{what}: 'audio_b64' (base64 int16 LE 24 kHz mono PCM) is required")
    budget[0] -= len(data)
    if budget[0] < 0:
        raise ProtocolError("too_large", "audio too large for one request")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{what}: 'audio_b64' is not valid base64") from None
    if len(raw) % 2 or not raw:
        raise InvalidRequest(f"{what}: audio must be whole int16 samples")
    return from_int16(raw)


def int_field(msg: dict[str, Any], key: str, default: int | None) -> int | None:
    value = msg.get(key, default)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise InvalidRequest(f"'{key}' must be an integer, got {value!r}")


def _num(msg: dict[str, Any], key: str, default: float | None) -> float | None:
    value = msg.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"'{key}' must be a number, got {value!r}")
    return float(value)


def session_id(msg: dict[str, Any]) -> str | None:
    """The message's ``session`` (None when absent); the same rules as request ids."""
    return name_field(msg, "session")


def parse_voice(
    item: Any, limits: Limits, voices: Mapping[str, VoicePrompt] | None = None, budget: list[int] | None = None
) -> VoicePrompt | None:
    """A ``voice`` field: absent, the name of one of the server's voices, or {speaker, text, audio_b64}."""
    if item is None:
        return None
    if isinstance(item, str):
        voices = voices or {}
        if item not in voices:
            known = ", ".join(sorted(voices)) or "none (start the server with --voice NAME=CLIP.wav)"
            raise InvalidRequest(f"unknown voice {item!r}; this server's voices: {known}")
        return voices[item]
    if not isinstance(item, dict):
        raise InvalidRequest("'voice' must be a voice name or a {speaker, text, audio_b64} object")
    budget = budget if budget is not None else [limits.max_audio_b64_bytes]
    return VoicePrompt(int_field(item, "speaker", 0), item.get("text"), _audio(item, "voice", budget))


def parse_turn(msg: dict[str, Any], limits: Limits) -> tuple[str, np.ndarray]:
    """The transcript and 24 kHz audio of a ``user_turn``."""
    text = msg.get("text")
    if not isinstance(text, str) or not text.strip() or len(text) > limits.max_text_chars:
        raise InvalidRequest(f"'text' (the turn's transcript) must be 1 to {limits.max_text_chars} characters")
    return text, _audio(msg, "user_turn", [limits.max_audio_b64_bytes])


def parse_start(
    msg: dict[str, Any], limits: Limits, voices: Mapping[str, VoicePrompt] | None = None
) -> SynthesisRequest:
    """The engine request a ``start`` message asks for (raises ProtocolError / InvalidRequest)."""
    text = msg.get("text")
    if not isinstance(text, str):
        raise InvalidRequest("'text' (the words to speak) is required")
    if len(text) > limits.max_text_chars:
        raise ProtocolError("too_large", f"text too long: {len(text)} characters (at most {limits.max_text_chars})")
    budget = [limits.max_audio_b64_bytes]
    context = msg.get("context") or []
    if not isinstance(context, list) or not all(isinstance(s, dict) for s in context):
        raise InvalidRequest("'context' must be a list of {speaker, text, audio_b64} objects")
    if len(context) > limits.max_context_segments:
        raise ProtocolError("too_large", f"too many context segments (at most {limits.max_context_segments})")
    segments = []
    for i, item in enumerate(context):
        speaker = int_field(item, "speaker", 1)
        seg_text = item.get("text")
        if not isinstance(seg_text, str) or len(seg_text) > limits.max_text_chars:
            raise InvalidRequest(f"context[{i}]: 'text' must be a string of at most {limits.max_text_chars} characters")
        segments.append(Segment(speaker, seg_text, _audio(item, f"context[{i}]", budget)))
    voice = parse_voice(msg.get("voice"), limits, voices, budget)
    chunks = ChunkSchedule()
    if msg.get("chunks") is not None:
        c = msg["chunks"]
        if not isinstance(c, dict):
            raise InvalidRequest("'chunks' must be {first_frames, growth, max_frames}")
        chunks = ChunkSchedule(
            first_frames=int_field(c, "first_frames", 1),
            growth=_num(c, "growth", 2.0),
            max_frames=int_field(c, "max_frames", 25),
        )
    watermark = msg.get("watermark")
    if watermark is not None and not isinstance(watermark, bool):
        raise InvalidRequest("'watermark' must be true, false or absent")
    return SynthesisRequest(
        text=text,
        speaker=int_field(msg, "speaker", 0),
        context=tuple(segments),
        voice=voice,
        temperature=_num(msg, "temperature", 0.9),
        topk=int_field(msg, "topk", 50),
        seed=int_field(msg, "seed", None),
        max_audio_ms=_num(msg, "max_audio_ms", 90_000),
        chunks=chunks,
        watermark=watermark,
        max_ahead_s=_num(msg, "max_ahead_s", None),
    )


def start_message(rid: str, request: SynthesisRequest, codes: bool = False, known: set[str] | None = None) -> str:
    """The ``start`` message for an engine request (what :class:`RemoteEngine` sends).

    Each audio goes with an ``audio_id`` (a hash of its samples); audio whose id is in ``known`` (sent
    before on this connection) goes as the id alone, and every id sent is added to ``known``.
    """
    known = known if known is not None else set()

    def audio_fields(audio: np.ndarray) -> dict[str, str]:
        pcm = to_int16(audio)
        aid = hashlib.sha1(pcm).hexdigest()
        if aid in known:
            return {"audio_id": aid}
        known.add(aid)
        return {"audio_id": aid, "audio_b64": base64.b64encode(pcm).decode()}

    fields: dict[str, Any] = {
        "id": rid,
        "text": request.text,
        "speaker": request.speaker,
        "temperature": request.temperature,
        "topk": request.topk,
        "seed": request.seed,
        "max_audio_ms": request.max_audio_ms,
        "max_ahead_s": request.max_ahead_s,
        "chunks": {
            "first_frames": request.chunks.first_frames,
            "growth": request.chunks.growth,
            "max_frames": request.chunks.max_frames,
        },
        "codes": codes,
        "context": [
            {"speaker": s.speaker, "text": s.text, **audio_fields(to_mono(s.audio, s.sample_rate, "context audio"))}
            for s in request.context
        ],
    }
    if request.watermark is not None:
        fields["watermark"] = request.watermark
    if request.voice is not None:
        v = request.voice
        fields["voice"] = {"speaker": v.speaker, "text": v.text, **audio_fields(v.audio)}
    return message("start", **fields)


def codes_array(rows: list[list[int]] | None) -> np.ndarray:
    """An end message's ``codes`` (frames of K ints) as a (frames, K) array; (0, K) when there are none."""
    if not rows:
        return np.zeros((0, NUM_CODEBOOKS), dtype=np.int64)
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), -1)


def stats_dict(stats: Any) -> dict[str, Any]:
    fields = {
        "seed": stats.seed,
        "frames": stats.frames,
        "stop_reason": stats.stop_reason,
        "prompt_frames": stats.prompt_frames,
        "dropped_segments": stats.dropped_segments,
        "invalid_codes": stats.invalid_codes,
        "queued_s": stats.queued_s,
        "time_to_first_audio_s": stats.time_to_first_audio_s,
        "elapsed_s": stats.elapsed_s,
        "real_time_factor": stats.real_time_factor,
    }
    replica = getattr(stats, "replica", None)  # the Ray Serve replica that generated it (ray/stream.py)
    if replica is not None:
        fields["replica"] = replica
    return fields

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
    carries the sampled codes), ``words`` (true: audio frames come with ``words`` messages), ``queue``
    (true: the server says when the request waits for an engine slot and when it gets one),
    ``context`` (earlier turns, oldest first: ``[{"speaker": 1, "text": "...", "audio_b64": "..."}]``)
    and ``voice``
    (``{"speaker": 0, "text": "...", "audio_b64": "..."}``, or the name of one of the server's voices).
    Audio is base64 of int16 little-endian PCM, 24 kHz mono.

    Audio sent once need not be sent again: a context item or voice object with an ``audio_id`` (a
    string of at most 128 bytes) and its ``audio_b64`` is remembered under that id for the token's
    tenant (any of its connections may then give the ``audio_id`` alone). The server keeps the most
    recently used audio within its memory budget; an id it no longer has is answered with the error
    ``unknown_audio``, and the client sends the start again with the audio.

    ``session`` (a string of at most 128 bytes) names the conversation: the server keeps its voice
    and turn memory (see ``session`` below), for the token's tenant only. A start with a session
    and no ``context`` is conditioned on the session's last turns, uses the session's voice unless
    it names its own, and its audio becomes the session's next agent turn (cut where it was
    cancelled). ``"continue": true`` makes it a later part of the session's agent turn in progress
    (conditioned on the parts before it); ``"more": true`` leaves that turn open for further parts
    (close it with ``end_turn``).

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

``{"type": "words", "id": "r1", "words": [["Sure", 0.0, 0.31], ["thing.", 0.31, 0.72]]}``
    Only when the start asked for ``words``: the words of the text whose estimated start falls in the
    next audio frame of this id (sent just before it), each ``[word, start_s, end_s]`` in seconds from
    the request's first sample (for incremental text, from the first part's). Estimates: see
    ``misotts_agents.engine.words``. A frame with ``frames == 0`` may follow, carrying only words
    (end of speech came right after the previous frame).
``{"type": "queued", "id": "r1"}`` then ``{"type": "admitted", "id": "r1"}``
    Only when the start asked for ``queue``: ``queued`` when the request has to wait for an engine slot
    (busy engine, or its prompt being prepared), ``admitted`` once it has one (generation starts; sent
    at once when it did not wait; never for a request that ends without one).
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
    an id, nothing more comes for it. Codes: ``bad_json`` (not JSON, or nested too deep),
    ``bad_message`` (not an object with a ``type``; binary; text for no incremental request),
    ``unknown_type``, ``too_large`` (a size limit), ``invalid_request`` (any field of the wrong type,
    out of range, unknown or missing: the message names it), ``unknown_audio``, ``duplicate_id``,
    ``too_many`` (a limit of the connection or the tenant: requests, sessions, streams, requests
    waiting for a slot), ``busy`` (engine queue full, or the request waited past the engine's
    bound), ``closed`` (engine closed, or the server shutting down), ``unavailable`` (the engine
    lacks what the request needs, e.g. a watermark), ``internal``.
    ``retryable``: whether the same message may succeed if sent again (busy, too_many, unknown_audio
    with the audio, internal). The codes, their exceptions and HTTP statuses are one table:
    ``misotts_agents.errors.WIRE_CODES``. The connection stays open after every error.

Authentication: with server tokens, the WebSocket handshake must carry ``Authorization: Bearer
<token>`` (the token names the tenant); otherwise the server accepts and at once closes with code
1008 (policy violation). A browser page from an origin the server does not allow is refused
before the handshake (HTTP 403). Other closes: 1013 (try again later: too many connections, for
the server or the tenant), 1008 ``message rate`` (over ``max_messages_per_s`` beyond its burst: an
``error`` ``too_many`` comes first, and the connection's requests are cancelled), 1001 (idle too
long, or the server shutting down: each running request first gets an ``error`` ``closed``), 4008
(the client read nothing for ``send_timeout_s`` while audio waited: its requests are cancelled),
1009 (a frame over the transport's ``max_size``). A
message under that but still over the request limits is answered with an ``error`` (``too_large``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from misotts_agents.audio import to_int16, to_mono
from misotts_agents.engine.request import SynthesisRequest
from misotts_agents.engine.words import WordTiming
from misotts_agents.errors import WIRE_CODES, to_wire
from misotts_agents.model.config import NUM_CODEBOOKS

MAX_ID_BYTES = 128
_TAIL = struct.Struct("<IIB")
_LEN = struct.Struct("<H")
FLAG_FINAL = 1


#: The reason of the 1008 close of a client over its message rate (an unauthorized client's 1008 says
#: something else): the client library tells a limit from a refusal by it.
CLOSE_MESSAGE_RATE = "message rate"


@dataclass(frozen=True)
class Limits:
    """Every bound the server keeps, with its default (README "Exposing the server" says what a
    client sees at each)."""

    # One request.
    max_text_chars: int = 4_000  # one utterance, one appended piece, one transcript
    # base64 audio one start may use (context + voice, including audio referenced by id): about what
    # the model's 2048-frame context can hold (2048 * 1920 samples of int16), ~160 s.
    max_audio_b64_bytes: int = 11 * 1024 * 1024
    max_message_bytes: int = 6 * 1024 * 1024  # one JSON message or HTTP body, checked before parsing
    ws_max_size: int = 8 * 1024 * 1024  # the transport limit: larger frames close the connection
    max_context_segments: int = 16
    # Per connection.
    max_concurrent_per_connection: int = 8
    max_sessions_per_connection: int = 16
    # Messages a connection may send (pings included): a rate a second, and a burst above it. A
    # client streaming LLM tokens as `append`s to 8 requests at once stays well under it.
    max_messages_per_s: float = 200.0
    message_burst: int = 400
    send_buffer_bytes: int = 4 * 1024 * 1024  # audio and messages queued for a client
    socket_send_buffer_bytes: int = 256 * 1024  # the kernel's, per connection (not autotuned up to 4 MB)
    send_timeout_s: float = 10.0  # a full send queue for this long: the client is not reading, cut off
    ws_idle_timeout_s: float = 600.0  # no message and nothing running for this long: closed
    # Per tenant (one token), and for the whole server.
    max_connections: int = 256
    max_connections_per_tenant: int = 64
    max_streams_per_tenant: int = 32
    # Requests of one tenant not yet generating (queued for a slot, or being prepared): beyond it a
    # request is refused (too_many, retryable), so one tenant's burst cannot fill the engine's queue.
    max_waiting_per_tenant: int = 16
    retry_after_s: int = 1  # the Retry-After of a busy (503) or too_many (429) HTTP refusal
    max_sessions_per_tenant: int = 256
    session_ttl_s: float = 1800.0
    max_memory_bytes: int = 1024 * 1024 * 1024  # sessions + cached audio of every tenant together
    max_cached_audio_bytes: int = 64 * 1024 * 1024  # one tenant's audio kept by audio_id
    # HTTP.
    header_timeout_s: float = 10.0  # a request's line and headers must arrive within this
    body_timeout_s: float = 30.0  # and its body within this
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_header_bytes: int = 16 * 1024
    drain_timeout_s: float = 10.0  # on SIGTERM / SIGINT: running streams get this long to finish


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


def words_message(rid: str, words: Sequence[WordTiming], offset_s: float = 0.0) -> str:
    """The ``words`` message for the next audio frame of ``rid`` (times shifted by ``offset_s``)."""
    return message("words", id=rid, words=[[w.word, w.start_s + offset_s, w.end_s + offset_s] for w in words])


def parse_words(msg: dict[str, Any]) -> tuple[WordTiming, ...]:
    """The word timings of a ``words`` message (what the client attaches to the next chunk)."""
    words = msg.get("words")
    if not isinstance(words, list):
        raise ProtocolError("bad_message", "'words' must be a list of [word, start_s, end_s]")
    try:
        return tuple(WordTiming(str(w), float(a), float(b)) for w, a, b in words)
    except (TypeError, ValueError) as exc:
        raise ProtocolError("bad_message", f"'words' must be a list of [word, start_s, end_s]: {exc}") from exc


def start_message(
    rid: str,
    request: SynthesisRequest,
    codes: bool = False,
    known: set[str] | None = None,
    words: bool = False,
    queue: bool = False,
) -> str:
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
        "words": words,
        "queue": queue,
        "context": [
            {"speaker": s.speaker, "text": s.text, **audio_fields(to_mono(s.audio, s.sample_rate, "context audio"))}
            for s in request.context
        ],
    }
    if request.watermark is not None:
        fields["watermark"] = request.watermark
    if request.voice is not None:
        v = request.voice
        fields["voice"] = {"speaker": v.speaker, "text": v.text, **audio_fields(np.asarray(v.audio))}
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

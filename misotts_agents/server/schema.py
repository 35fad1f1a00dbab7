"""The one schema for what clients send: WebSocket messages (protocol.py) and the OpenAI speech body.

Every field has a type, checked strictly (``"5"`` is not an integer, ``true`` is not a number,
``null`` only where it means something), and every string a length. The ranges of the request
options are the engine's own (:class:`SynthesisRequest`, :class:`SamplingParams`): the schema checks
shape and type, the request checks bounds, and both failures reach the client as one line naming
the field, with code ``invalid_request`` (``too_large`` for a size limit): never ``internal``.

The sampling options are not listed here: their fields are made from
:func:`misotts_agents.engine.params.sampling_fields`, so a new option reaches the protocol, the
OpenAI body and the integrations from its one declaration.

Raw JSON is size- and count-checked before it is parsed, and its shape after (jsonshape.py), so
refusing any message costs time and memory bounded by the limits, not by the shape of its JSON.
"""

from __future__ import annotations

import base64
import binascii
import typing
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from misotts_agents.audio import from_int16
from misotts_agents.engine.params import SamplingParams, sampling_fields
from misotts_agents.engine.request import MAX_SPEAKER, ChunkSchedule, Segment, SynthesisRequest
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.errors import InvalidRequest
from misotts_agents.server.jsonshape import load_json
from misotts_agents.server.protocol import MAX_ID_BYTES, Limits, ProtocolError

_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
_M = TypeVar("_M", bound=BaseModel)
MAX_MODEL_NAME_CHARS = 256
MAX_INSTRUCTIONS_CHARS = 4_096


def _limits(info: ValidationInfo) -> Limits:
    context = info.context or {}
    return context.get("limits") or Limits()


def _check_name(value: str) -> str:
    """A client-chosen name: request id, session, audio id, voice name."""
    try:  # (more characters than bytes allowed: too long without encoding it)
        size = len(value.encode()) if len(value) <= MAX_ID_BYTES else len(value)
    except UnicodeEncodeError:
        raise PydanticCustomError("invalid_name", "must be valid UTF-8 (no lone surrogates)") from None
    if not 1 <= size <= MAX_ID_BYTES:
        raise PydanticCustomError(
            "invalid_name", "must be a non-empty string of at most {n} bytes", {"n": MAX_ID_BYTES}
        )
    return value


def _check_text(value: str, info: ValidationInfo) -> str:
    """Text to speak or a transcript: at most ``Limits.max_text_chars`` characters, valid UTF-8."""
    limit = _limits(info).max_text_chars
    if len(value) > limit:
        raise PydanticCustomError(
            "too_large", "too long: {n} characters (at most {limit})", {"n": len(value), "limit": limit}
        )
    try:
        value.encode()
    except UnicodeEncodeError:
        raise PydanticCustomError("invalid_text", "must be valid UTF-8 (no lone surrogates)") from None
    return value


Name = Annotated[str, AfterValidator(_check_name)]
Text = Annotated[str, AfterValidator(_check_text)]
Speaker = Annotated[int, Field(ge=0, le=MAX_SPEAKER)]


class _Model(BaseModel):
    model_config = _STRICT


class AudioItem(_Model):
    """Audio with its transcript: a context turn, or a voice prompt. ``audio_id`` names audio sent
    earlier on the connection (see protocol.py); ``audio_b64`` is int16 LE 24 kHz mono, base64."""

    speaker: Speaker = 1
    text: Text
    audio_b64: str | None = None
    audio_id: Name | None = None

    @field_validator("audio_b64")
    @classmethod
    def _b64(cls, value: str | None) -> str | None:
        if value is not None and (not value or not value.isascii()):
            raise PydanticCustomError("invalid_audio", "must be non-empty base64")
        return value

    @model_validator(mode="after")
    def _some_audio(self) -> AudioItem:
        if self.audio_b64 is None and self.audio_id is None:
            raise PydanticCustomError("missing_audio", "give 'audio_b64' (and optionally 'audio_id'), or 'audio_id'")
        return self


class VoiceItem(AudioItem):
    speaker: Speaker = 0


def _voice_kind(value: Any) -> str:
    return "name" if isinstance(value, str) else "object"


Voice = Annotated[
    Annotated[Name, Tag("name")] | Annotated[VoiceItem, Tag("object")],
    Discriminator(_voice_kind),
]


class Chunks(_Model):
    first_frames: int = ChunkSchedule.first_frames
    growth: float = ChunkSchedule.growth
    max_frames: int = ChunkSchedule.max_frames


def _sampling_model() -> type[BaseModel]:
    """A base model with one field per sampling option, typed and defaulted as declared."""
    hints = typing.get_type_hints(SamplingParams)
    fields: dict[str, Any] = {f.name: (hints[f.name], f.default) for f in sampling_fields()}
    return create_model("SamplingFields", __base__=_Model, **fields)


SamplingFields = _sampling_model()


class Start(SamplingFields):  # type: ignore[misc, valid-type]
    """``start``: one utterance (see protocol.py for each field)."""

    type: Literal["start"]
    id: Name
    text: Text = ""
    speaker: Speaker = 0
    max_audio_ms: float = 90_000
    max_ahead_s: float | None = None
    watermark: bool | None = None
    chunks: Chunks | None = None
    codes: bool = False
    words: bool = False
    queue: bool = False
    context: list[AudioItem] = Field(default_factory=list)
    voice: Voice | None = None
    session: Name | None = None
    continue_: bool = Field(False, alias="continue")
    more: bool = False
    incremental: bool = False

    model_config = ConfigDict(populate_by_name=True)

    @field_validator("context")
    @classmethod
    def _few_segments(cls, value: list[AudioItem], info: ValidationInfo) -> list[AudioItem]:
        limit = _limits(info).max_context_segments
        if len(value) > limit:
            raise PydanticCustomError("too_large", "too many context segments (at most {n})", {"n": limit})
        return value

    @model_validator(mode="after")
    def _audio_budget(self, info: ValidationInfo) -> Start:
        limit = _limits(info).max_audio_b64_bytes
        items = [*self.context, *([self.voice] if isinstance(self.voice, VoiceItem) else [])]
        if sum(len(i.audio_b64 or "") for i in items) > limit:
            raise PydanticCustomError(
                "too_large", "audio too large for one request (at most {n} bytes of base64)", {"n": limit}
            )
        return self


class Append(_Model):
    type: Literal["append"]
    id: Name
    text: Text
    flush: bool = False


class End(_Model):
    type: Literal["end"]
    id: Name


class Cancel(_Model):
    type: Literal["cancel"]
    id: Name


class SessionOp(StrEnum):
    """What a ``session`` message does (the wire strings are the values)."""

    VOICE = "voice"
    USER_TURN = "user_turn"
    END_TURN = "end_turn"
    CLEAR = "clear"
    CLOSE = "close"


class Session(_Model):
    """``session``: change a conversation's server-side state (see :class:`SessionOp`)."""

    type: Literal["session"]
    session: Name
    op: SessionOp = Field(strict=False)  # from its wire string
    voice: Voice | None = None
    speaker: Speaker = 1
    text: Text | None = None
    audio_b64: str | None = None
    interrupted: bool = False

    @model_validator(mode="after")
    def _turn_complete(self) -> Session:
        if self.op is SessionOp.USER_TURN and (not (self.text or "").strip() or not self.audio_b64):
            raise PydanticCustomError("missing_turn", "a user_turn needs 'text' (its transcript) and 'audio_b64'")
        return self


class Ping(_Model):
    type: Literal["ping"]


def _by_type(*models: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Each message model under its ``type`` (the one value of its ``Literal``)."""
    return {typing.get_args(m.model_fields["type"].annotation)[0]: m for m in models}


#: What a client may send, by ``type``: a message is validated against its one model (an unknown
#: type is refused before any validation, so the error never repeats a long ``type`` back).
MESSAGES = _by_type(Start, Append, End, Cancel, Session, Ping)


# -- the OpenAI speech body -------------------------------------------------------------------------


class ResponseFormat(StrEnum):
    """Audio formats of ``/v1/audio/speech``; a new format is a member here plus its encoder."""

    WAV = "wav"
    PCM = "pcm"
    MP3 = "mp3"
    OPUS = "opus"  # in Ogg
    AAC = "aac"  # ADTS
    FLAC = "flac"


class SpeechBody(SamplingFields):  # type: ignore[misc, valid-type]
    """OpenAI's ``POST /v1/audio/speech`` body, plus this server's extensions (``session``, the
    sampling options, ``max_audio_ms``). ``voice``: a named voice of the server, a speaker id
    (``"1"`` or 1), or any other OpenAI voice name (the default voice)."""

    model: str | None = Field(None, max_length=MAX_MODEL_NAME_CHARS)
    input: Text
    voice: Annotated[str, Field(max_length=MAX_ID_BYTES)] | Speaker | None = None
    response_format: ResponseFormat = Field(ResponseFormat.WAV, strict=False)
    speed: float = 1.0
    instructions: str | None = Field(None, max_length=MAX_INSTRUCTIONS_CHARS)  # accepted, not used
    stream_format: Literal["audio"] | None = None
    session: Name | None = None
    max_audio_ms: float | None = None

    @field_validator("input")
    @classmethod
    def _something_to_say(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("empty_input", "'input' (the text to speak) is empty")
        return value

    @field_validator("speed")
    @classmethod
    def _normal_speed(cls, value: float) -> float:
        if value != 1.0:
            raise PydanticCustomError("unsupported", "only speed 1.0 is supported")
        return value

    def start(self, voices: Mapping[str, Any] | None) -> Start:
        """The protocol ``start`` this body asks for, from fields already checked (not validated again)."""
        fields: dict[str, Any] = {"type": "start", "id": "speech", "text": self.input}
        voice = self.voice
        if isinstance(voice, str) and voice.isascii() and voice.isdecimal():
            voice = int(voice)
        if isinstance(voice, int):
            fields["speaker"] = voice
        elif voice is not None and voices:
            fields["voice"] = voice  # one of the server's named voices (an unknown name is refused)
        # Other OpenAI voice names mean the default voice on a server without named voices.
        extras = {"session", "max_audio_ms", *(f.name for f in sampling_fields())} & self.model_fields_set
        fields |= {k: getattr(self, k) for k in extras if getattr(self, k) is not None}
        return Start.model_construct(**fields)


# -- parsing ----------------------------------------------------------------------------------------


def parse_message(text: str, limits: Limits) -> BaseModel:
    """One WebSocket message, validated (raises ProtocolError with the protocol's code)."""
    data = load_json(text, limits)
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ProtocolError("bad_message", "a message is a JSON object with a 'type' (a string)")
    rid = _valid_name(data.get("id"))  # for the error's "id", when the id itself is fine
    model = MESSAGES.get(data["type"])
    if model is None:
        raise ProtocolError("unknown_type", f"unknown message type {data['type'][:40]!r}", rid)
    return validated(model, data, limits, rid)


def _valid_name(value: Any) -> str | None:
    try:
        return _check_name(value) if isinstance(value, str) else None
    except PydanticCustomError:
        return None


def parse_speech_body(body: bytes, limits: Limits) -> SpeechBody:
    data = load_json(body, limits)
    if not isinstance(data, dict):
        raise ProtocolError("invalid_request", "the body must be a JSON object")
    return validated(SpeechBody, data, limits)


def validated(model: type[_M], data: dict[str, Any], limits: Limits, rid: str | None = None) -> _M:
    """``data`` as ``model`` under the server's ``limits``; a failure is the protocol's one-line error."""
    try:
        return model.model_validate(data, context={"limits": limits})
    except ValidationError as exc:
        raise invalid(exc, rid) from None


def invalid(exc: ValidationError, rid: str | None = None) -> ProtocolError:
    """A validation failure as one line naming each field (at most three), never the input itself."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    code = "too_large" if any(e["type"] == "too_large" for e in errors) else "invalid_request"
    parts = []
    for e in errors[:3]:
        where = _where(e["loc"])
        if e["type"] == "missing":
            parts.append(f"'{where}' is required")
        else:
            parts.append(f"'{where}': {e['msg']}" if where else e["msg"])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    error = ProtocolError(code, "; ".join(parts) + more, rid)
    error.param = _where(errors[0]["loc"]) or None  # type: ignore[attr-defined]
    return error


def _where(loc: tuple[int | str, ...]) -> str:
    """A field's path (``context.0.text``), without the names pydantic gives union members."""
    keep = [_short_key(p) for p in loc if isinstance(p, int) or not (p in _MEMBERS or "[" in p)]
    return ".".join(keep)


def _short_key(part: int | str) -> str:
    """A path part as the error names it: a client's unknown key (at most jsonshape.MAX_KEY_CHARS)
    printable, a lone surrogate in it escaped."""
    return str(part) if isinstance(part, int) else part.encode("utf-8", "backslashreplace").decode()


_MEMBERS = {"name", "object", "str", "int"}


def decode_audio(data: str | None, what: str) -> np.ndarray:
    """Base64 int16 LE 24 kHz mono PCM -> float32."""
    if not data:
        raise InvalidRequest(f"{what}: 'audio_b64' (base64 int16 LE 24 kHz mono PCM) is required")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{what}: 'audio_b64' is not valid base64") from None
    if len(raw) % 2 or not raw:
        raise InvalidRequest(f"{what}: audio must be whole int16 samples")
    return from_int16(raw)


def parse_voice(item: str | VoiceItem | None, voices: Mapping[str, VoicePrompt] | None = None) -> VoicePrompt | None:
    """A ``voice`` field: absent, the name of one of the server's voices, or an audio object."""
    if item is None:
        return None
    if isinstance(item, str):
        voices = voices or {}
        if item not in voices:
            known = ", ".join(sorted(voices)) or "none (start the server with --voice NAME=CLIP.wav)"
            raise InvalidRequest(f"unknown voice {item!r}; this server's voices: {known}")
        return voices[item]
    return VoicePrompt(item.speaker, item.text, decode_audio(item.audio_b64, "voice"))


def parse_start(start: Start, voices: Mapping[str, VoicePrompt] | None = None) -> SynthesisRequest:
    """The engine request a validated ``start`` asks for (raises InvalidRequest: the request's own
    bounds, audio that does not decode, an unknown voice)."""
    segments = tuple(
        Segment(item.speaker, item.text, decode_audio(item.audio_b64, f"context[{i}]"))
        for i, item in enumerate(start.context)
    )
    chunks = ChunkSchedule(**start.chunks.model_dump()) if start.chunks is not None else ChunkSchedule()
    return SynthesisRequest(
        text=start.text,
        speaker=start.speaker,
        context=segments,
        voice=parse_voice(start.voice, voices),
        max_audio_ms=start.max_audio_ms,
        chunks=chunks,
        watermark=start.watermark,
        max_ahead_s=start.max_ahead_s,
        **{f.name: getattr(start, f.name) for f in sampling_fields()},
    )


def parse_turn(msg: Session) -> tuple[int, str, np.ndarray]:
    """The speaker, transcript and 24 kHz audio of a ``user_turn``."""
    return msg.speaker, msg.text or "", decode_audio(msg.audio_b64, "user_turn")

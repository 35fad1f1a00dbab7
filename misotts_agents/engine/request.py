"""What a caller asks the engine for, and what it gets back.

Light on purpose (numpy, no torch): the server's client, the protocol and the integrations' option
checks build requests and read chunks without loading the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from misotts_agents.audio import FRAME_MS, SAMPLE_RATE, to_int16
from misotts_agents.engine.params import SamplingParams
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.engine.words import WordTiming
from misotts_agents.errors import InvalidRequest
from misotts_agents.model.config import MAX_SEQ_LEN

if TYPE_CHECKING:
    import torch

# Far above what fits in the 2048-position prompt; refuses megabyte strings before tokenising them.
MAX_TEXT_CHARS = 100_000
# Every option has bounds, checked when the request is made: a value the scheduler cannot use must
# never reach its batched step, where one request's failure would end the others' too.
MAX_SPEAKER = 9_999  # speaker ids are written into the text ("[3] Hello"); real prompts use a few
MAX_CONTEXT_SEGMENTS = 256  # far more than fit in the window (the prompt drops the oldest anyway)
MAX_CHUNK_GROWTH = 16.0
MAX_AHEAD_S = 3_600.0


@dataclass(frozen=True)
class Segment:
    """One earlier utterance in the conversation: who spoke, what they said, and how it sounded."""

    speaker: int
    text: str
    audio: np.ndarray | torch.Tensor
    sample_rate: int = SAMPLE_RATE


def max_frames_for(max_audio_ms: float) -> int:
    """The frames a request of ``max_audio_ms`` may generate (checked against the model's window)."""
    _number(max_audio_ms, "max_audio_ms", FRAME_MS, (MAX_SEQ_LEN - 1) * FRAME_MS, unit=" ms")
    frames = int(max_audio_ms / FRAME_MS)
    if not 1 <= frames < MAX_SEQ_LEN:
        raise InvalidRequest(
            f"max audio length {max_audio_ms} ms gives {frames} frames; it must be between {FRAME_MS} ms and "
            f"{(MAX_SEQ_LEN - 1) * FRAME_MS} ms"
        )
    return frames


@dataclass(frozen=True)
class ChunkSchedule:
    """How many 80 ms frames go into each streamed chunk.

    The first chunk leaves after ``first_frames`` frames (time to first audio), later chunks grow by
    ``growth`` up to ``max_frames``: small chunks early for latency, larger ones later so that
    per-chunk overhead (and the per-chunk watermark, which is stronger on longer blocks) stays low.
    """

    first_frames: int = 1
    growth: float = 2.0
    max_frames: int = 25

    def __post_init__(self) -> None:
        _integer(self.first_frames, "chunks.first_frames", 1, MAX_SEQ_LEN)
        _integer(self.max_frames, "chunks.max_frames", self.first_frames, MAX_SEQ_LEN)
        _number(self.growth, "chunks.growth", 1.0, MAX_CHUNK_GROWTH)

    def sizes(self) -> Iterator[int]:
        # Capped as it grows: the size never leaves [first_frames, max_frames], however long the
        # utterance (an uncapped product overflows to infinity after ~1000 chunks at growth 2).
        size = float(self.first_frames)
        while True:
            yield min(int(size), self.max_frames)
            size = min(size * self.growth, float(self.max_frames))


@dataclass(frozen=True)
class SynthesisRequest(SamplingParams):
    """One utterance: the text, the conversation so far (tone and voice), and sampling settings.

    The sampling options (``temperature``, ``topk``, ``seed``) come from :class:`SamplingParams` and
    are keyword-only.

    ``voice`` fixes the voice (its prefill is cached per voice); ``context`` holds earlier turns,
    oldest first (the user's last turn carries its tone). ``max_ahead_s`` paces generation: the
    request is not run more than that many seconds of audio ahead of real time (counted from its
    first audio), so an interrupted reply wastes little GPU work; None runs flat out.
    """

    text: str
    speaker: int = 0
    context: tuple[Segment, ...] = ()
    voice: VoicePrompt | None = None
    max_audio_ms: float = 90_000
    chunks: ChunkSchedule = field(default_factory=ChunkSchedule)
    watermark: bool | None = None  # None: the engine's setting; False opts this request out
    max_ahead_s: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "context", tuple(self.context))
        if not isinstance(self.text, str) or not self.text.strip():
            raise InvalidRequest("text is empty: give the words to speak")
        if len(self.text) > MAX_TEXT_CHARS:
            raise InvalidRequest(f"text too long: {len(self.text)} characters (at most {MAX_TEXT_CHARS}); split it")
        super().__post_init__()
        _integer(self.speaker, "speaker", 0, MAX_SPEAKER)
        max_frames_for(self.max_audio_ms)
        if not isinstance(self.chunks, ChunkSchedule):
            raise InvalidRequest(f"chunks must be a ChunkSchedule, got {type(self.chunks).__name__}")
        if self.voice is not None:
            if not isinstance(self.voice, VoicePrompt):
                raise InvalidRequest(f"voice must be a VoicePrompt, got {type(self.voice).__name__}")
            _integer(self.voice.speaker, "voice.speaker", 0, MAX_SPEAKER)
        if len(self.context) > MAX_CONTEXT_SEGMENTS:
            raise InvalidRequest(f"too many context segments: {len(self.context)} (at most {MAX_CONTEXT_SEGMENTS})")
        for i, seg in enumerate(self.context):
            if not isinstance(seg, Segment):
                raise InvalidRequest(f"context[{i}] is a {type(seg).__name__}, expected a Segment")
            _integer(seg.speaker, f"context[{i}].speaker", 0, MAX_SPEAKER)
            if not isinstance(seg.text, str) or len(seg.text) > MAX_TEXT_CHARS:
                raise InvalidRequest(f"context[{i}].text must be a string of at most {MAX_TEXT_CHARS} characters")
        if self.watermark is not None and not isinstance(self.watermark, bool):
            raise InvalidRequest(f"watermark must be True, False or None, got {self.watermark!r}")
        if self.max_ahead_s is not None:
            _number(self.max_ahead_s, "max_ahead_s", 0.0, MAX_AHEAD_S, unit=" s")

    @property
    def max_frames(self) -> int:
        return max_frames_for(self.max_audio_ms)


@dataclass(frozen=True)
class AudioChunk:
    """A piece of the utterance's audio: float32 mono PCM in [-1, 1].

    ``words``: the words of the request's text whose (estimated) start falls in this chunk, timed
    from the request's first sample (:mod:`misotts_agents.engine.words`). Every word spoken comes
    with exactly one chunk; when end of speech comes just after a chunk, the last words come with
    an empty final chunk (``frames == 0``).
    """

    pcm: np.ndarray
    start_frame: int
    frames: int
    final: bool
    sample_rate: int = SAMPLE_RATE
    words: tuple[WordTiming, ...] = ()

    @property
    def duration_s(self) -> float:
        return self.pcm.size / self.sample_rate

    @property
    def start_s(self) -> float:
        """Where the chunk starts in the request's audio, seconds."""
        return self.start_frame * FRAME_MS / 1000

    def to_int16(self) -> bytes:
        return to_int16(self.pcm)


class StopReason(StrEnum):
    """Why a request ended; the values are the wire strings (``stats.stop_reason``)."""

    RUNNING = "running"  # not ended yet
    EOS = "eos"  # the model ended the speech
    MAX_FRAMES = "max_frames"  # the request's audio limit
    CONTEXT_FULL = "context_full"  # the model's context is full
    CANCELLED = "cancelled"
    ERROR = "error"
    EMPTY = "empty"  # an incremental server request that got no text


@dataclass
class StreamStats:
    """Figures for one request; filled in as it runs."""

    seed: int = 0
    prompt_frames: int = 0
    dropped_segments: int = 0
    frames: int = 0
    invalid_codes: int = 0
    queued_s: float | None = None  # from submission to the start of prefill
    time_to_first_audio_s: float | None = None  # from submission to the first chunk handed to the caller
    elapsed_s: float = 0.0  # from submission to the end
    stop_reason: str = StopReason.RUNNING  # a StopReason (plain strings compare equal to them)

    @property
    def audio_s(self) -> float:
        return self.frames * FRAME_MS / 1000

    @property
    def real_time_factor(self) -> float | None:
        """Wall seconds per second of audio, submission to end (below 1 is faster than real time)."""
        return self.elapsed_s / self.audio_s if self.frames else None


@dataclass(frozen=True)
class Synthesis:
    """A whole utterance: audio, the codes that made it, and its figures."""

    pcm: np.ndarray
    codes: np.ndarray  # (frames, K) int
    stats: StreamStats
    sample_rate: int = SAMPLE_RATE


def join_stream(stream: Any) -> Synthesis:
    """A whole utterance from a stream (iterated here, blocking): its audio, codes and figures.
    Shared by :class:`MisoEngine` and the server's client."""
    with stream:
        chunks = [c.pcm for c in stream]
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return Synthesis(pcm=pcm, codes=stream.codes, stats=stream.stats)


def _integer(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be an integer in [{low}, {high}], got {_short(value)}")
    return int(value)


def _number(value: Any, name: str, low: float, high: float, unit: str = "") -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not low <= value <= high:  # (NaN compares False: refused too; no float() of huge ints)
        raise InvalidRequest(f"{name} must be a number in [{low:g}, {high:g}]{unit}, got {_short(value)}")
    return float(value)


def _short(value: Any) -> str:
    """A value for an error message: never a 400-digit integer or a megabyte string."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."

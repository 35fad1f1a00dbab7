"""What a caller asks the engine for, and what it gets back."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from misotts_agents.audio import SAMPLE_RATE
from misotts_agents.engine.params import SamplingParams
from misotts_agents.engine.prompt import FRAME_MS, Segment, max_frames_for
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.errors import InvalidRequest

# Far above what fits in the 2048-position prompt; refuses megabyte strings before tokenising them.
MAX_TEXT_CHARS = 100_000


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
        if self.first_frames < 1 or self.max_frames < self.first_frames or self.growth < 1.0:
            raise InvalidRequest(
                "chunk schedule needs 1 <= first_frames <= max_frames and growth >= 1, "
                f"got {self.first_frames}, {self.max_frames}, {self.growth}"
            )

    def sizes(self) -> Iterator[int]:
        size = float(self.first_frames)
        while True:
            yield min(int(size), self.max_frames)
            size *= self.growth


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
        max_frames_for(self.max_audio_ms)
        if self.voice is not None and not isinstance(self.voice, VoicePrompt):
            raise InvalidRequest(f"voice must be a VoicePrompt, got {type(self.voice).__name__}")
        if self.max_ahead_s is not None and not self.max_ahead_s >= 0:
            raise InvalidRequest(f"max_ahead_s must be >= 0 or None, got {self.max_ahead_s}")

    @property
    def max_frames(self) -> int:
        return max_frames_for(self.max_audio_ms)


@dataclass(frozen=True)
class AudioChunk:
    """A piece of the utterance's audio: float32 mono PCM in [-1, 1]."""

    pcm: np.ndarray
    start_frame: int
    frames: int
    final: bool
    sample_rate: int = SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return self.pcm.size / self.sample_rate

    def to_int16(self) -> bytes:
        return (np.clip(self.pcm, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


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
    stop_reason: str = "running"  # eos | max_frames | context_full | cancelled | error

    @property
    def audio_s(self) -> float:
        return self.frames * FRAME_MS / 1000

    @property
    def real_time_factor(self) -> float | None:
        """Wall seconds per second of audio, submission to end (below 1 is faster than real time)."""
        return self.elapsed_s / self.audio_s if self.frames else None

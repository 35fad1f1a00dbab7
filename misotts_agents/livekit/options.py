"""The options of a LiveKit :class:`~misotts_agents.livekit.TTS`, checked once and made into requests.

Every option is checked when it is set (the constructor, ``update_options``) by making a request
with it: the request declares the bounds, so a bad value fails there and not on the first reply.
"""

from __future__ import annotations

from dataclasses import dataclass

from misotts_agents.engine.request import Segment, SynthesisRequest
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.errors import InvalidRequest


@dataclass
class TTSOptions:
    model: str
    speaker: int
    temperature: float
    topk: int
    max_audio_ms: float
    voice: VoicePrompt | None
    tone_conditioning: bool
    max_ahead_s: float | None

    def check(self) -> TTSOptions:
        """Raise ValueError (InvalidRequest) unless every request made with these options is valid:
        the request declares the bounds (SamplingParams for the sampling options)."""
        self.request("x", self.voice)
        if not isinstance(self.tone_conditioning, bool):
            raise InvalidRequest(f"tone_conditioning must be True or False, got {self.tone_conditioning!r}")
        return self

    def request(self, text: str, voice: VoicePrompt | None, context: tuple[Segment, ...] = ()) -> SynthesisRequest:
        """The engine request for ``text`` with these options."""
        return SynthesisRequest(
            text,
            speaker=self.speaker,
            context=context,
            voice=voice,
            temperature=self.temperature,
            topk=self.topk,
            max_audio_ms=self.max_audio_ms,
            max_ahead_s=self.max_ahead_s,
        )

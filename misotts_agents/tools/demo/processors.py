"""The demo's small Pipecat processors: the offline stand-ins for a speech recognizer and a language
model, and the log of what MisoTTS said. Imports Pipecat (slow): imported only when a pipeline is built."""

from __future__ import annotations

import logging
from typing import Any

from pipecat.frames.frames import (
    Frame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.settings import STTSettings
from pipecat.services.stt_service import SegmentedSTTService
from pipecat.utils.time import time_now_iso8601

from misotts_agents.tools.demo.scripted import placeholder_transcript, scripted_reply

log = logging.getLogger(__name__)


class PlaceholderSTTService(SegmentedSTTService):
    """No recognizer: each VAD segment becomes the transcript "(user spoke for N s)"."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(settings=STTSettings(model=None, language=None), **kwargs)

    @property
    def wants_wav_segments(self) -> bool:
        return False

    async def run_stt(self, audio: bytes):
        seconds = max(len(audio) / 2 / self.sample_rate - self._trailing_silence_secs, 0.0)
        text = placeholder_transcript(seconds)
        log.info("user turn: %.1f s of audio, no speech recognizer, transcript placeholder %r", seconds, text)
        yield TranscriptionFrame(text, self._user_id, time_now_iso8601())


class ScriptedLLM(FrameProcessor):
    """Stands where the LLM goes: answers each user turn with :func:`scripted_reply`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.turns = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMContextFrame):
            if getattr(frame, "speculation", False):
                return
            user_text = last_user_text(frame.context)
            reply = scripted_reply(user_text, self.turns)
            self.turns += 1
            log.info("scripted reply to %r: %r", user_text, reply)
            await self.push_frame(LLMFullResponseStartFrame())
            await self.push_frame(LLMTextFrame(reply))
            await self.push_frame(LLMFullResponseEndFrame())
        else:
            await self.push_frame(frame, direction)


class SpeechLog(FrameProcessor):
    """After the TTS: logs each reply's audio (seconds, rate) and what it was conditioned on."""

    def __init__(self, tts: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._tts = tts
        self._samples = 0
        self._rate = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSStartedFrame):
            self._samples, self._rate = 0, 0
            memory = getattr(self._tts, "memory", None)
            if memory is not None and getattr(self._tts, "tone_conditioning", False):
                turns = ", ".join(
                    f"{'user' if seg.speaker == memory.user_speaker else 'agent'} "
                    f"{len(seg.audio) / seg.sample_rate:.1f} s {seg.text[:40]!r}"
                    for seg in memory.context()
                )
                log.info("reply conditioned on: %s", turns or "nothing yet (first turn)")
        elif isinstance(frame, TTSAudioRawFrame):
            if not self._samples:
                log.info("MisoTTS audio streaming: %d Hz, %d channel(s)", frame.sample_rate, frame.num_channels)
            self._samples += len(frame.audio) // 2 // max(frame.num_channels, 1)
            self._rate = frame.sample_rate
        elif isinstance(frame, TTSStoppedFrame) and self._rate:
            log.info("MisoTTS spoke %.2f s of audio at %d Hz", self._samples / self._rate, self._rate)
        await self.push_frame(frame, direction)


def last_user_text(context: Any) -> str:
    """The text of the last user message in a Pipecat LLM context."""
    for message in reversed(context.get_messages()):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""

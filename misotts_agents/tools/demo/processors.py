"""The demo's small Pipecat processors: the offline stand-ins for a speech recognizer and a language
model, the page's controls (tone conditioning switch, uploaded voice) applied where a reply starts,
and the per-turn report (log lines and a message to the page). Imports Pipecat (slow): imported only
when a pipeline is built."""

from __future__ import annotations

import logging
import time
from typing import Any

from pipecat.frames.frames import (
    AggregatedTextFrame,
    Frame,
    InterruptionFrame,
    LLMContextFrame,
    LLMContextUserTurnFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.processors.frameworks.rtvi import RTVIClientMessageFrame, RTVIServerMessageFrame
from pipecat.services.settings import STTSettings
from pipecat.services.stt_service import SegmentedSTTService
from pipecat.utils.time import time_now_iso8601

from misotts_agents.engine.memory import ConversationMemory
from misotts_agents.engine.request import Segment
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.tools.demo.scripted import placeholder_transcript, scripted_reply

log = logging.getLogger(__name__)

TONE_MESSAGE = "tone-conditioning"  # the page's RTVI client message: {"on": true | false}
TURN_MESSAGE = "miso-turn"  # the server messages the page draws its turn table from


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


class SwitchableMemory(ConversationMemory):
    """Turn memory that always records, and gives the prompt the turns only while ``conditioning``
    is on: switching it on conditions the very next reply on the turns just spoken."""

    def __init__(self, *, conditioning: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conditioning = conditioning

    def context(self) -> tuple[Segment, ...]:
        return super().context() if self.conditioning else ()

    def current_agent_segment(self) -> Segment | None:
        return super().current_agent_segment() if self.conditioning else None


class DemoControls(FrameProcessor):
    """Before the TTS: the page's tone-conditioning switch (an RTVI client message) and an uploaded
    voice (:meth:`set_voice`), applied when the next reply starts, never in the middle of one. It also
    notes which user turn each reply answers (its text, when it ended), in order: after the TTS,
    frames may be reordered around a reply's audio."""

    def __init__(self, tts: Any, memory: SwitchableMemory, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._tts = tts
        self._memory = memory
        self._tone: bool | None = None
        self._voice: VoicePrompt | None = None
        self._voices = 0
        self._user_text = ""
        self._user_stopped: float | None = None
        self._answering: tuple[str | None, float | None] = (None, None)

    def set_voice(self, voice: VoicePrompt) -> None:
        self._voice = voice

    def take_answered_turn(self) -> tuple[str | None, float | None]:
        """The user turn the reply now starting answers: its text and when it ended (None, None for
        a reply that answers nothing, like the greeting)."""
        answering, self._answering = self._answering, (None, None)
        return answering

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, RTVIClientMessageFrame) and frame.type == TONE_MESSAGE:
            self._tone = bool((frame.data or {}).get("on"))
            log.info("tone conditioning %s from the next reply", "on" if self._tone else "off")
            await self.push_frame(RTVIServerMessageFrame(data={"type": TONE_MESSAGE, "on": self._tone}))
            return
        if isinstance(frame, UserStartedSpeakingFrame):
            self._user_text, self._user_stopped = "", None
        elif isinstance(frame, UserStoppedSpeakingFrame):
            self._user_stopped = time.monotonic()
        elif isinstance(frame, LLMContextUserTurnFrame):
            self._user_text = frame.text
        elif direction == FrameDirection.DOWNSTREAM and isinstance(frame, (LLMFullResponseStartFrame, TTSSpeakFrame)):
            if isinstance(frame, TTSSpeakFrame):
                self._answering = (None, None)
            else:
                self._answering = (self._user_text or None, self._user_stopped)
                self._user_text, self._user_stopped = "", None
            await self._apply()
        await self.push_frame(frame, direction)

    async def _apply(self) -> None:
        if self._tone is not None:
            self._memory.conditioning, self._tone = self._tone, None
        if self._voice is not None:
            self._voices += 1
            name = f"uploaded-{self._voices}"
            self._tts.register_voice(name, self._voice)
            self._voice = None
            log.info("voice prompt %s in use from this reply", name)
            await self.push_frame(TTSUpdateSettingsFrame(delta=type(self._tts).Settings(voice=name)))


class TurnReport(FrameProcessor):
    """After the TTS: each reply's figures, logged and sent to the page (an RTVI server message
    ``miso-turn``): the user's transcript, the bot's text, time to first audio (from the end of the
    user's turn, and from the TTS request), whether tone conditioning was on and on what."""

    def __init__(self, controls: DemoControls, memory: SwitchableMemory, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._controls = controls
        self._memory = memory
        self._turn = 0
        self._open = False
        self._user_text: str | None = None
        self._user_stopped: float | None = None
        self._started = 0.0
        self._first_audio: float | None = None
        self._bot_text: list[str] = []  # the sentences of the reply (the TTS announces each before its audio)
        self._next_text: list[str] = []  # announced before the reply's TTSStartedFrame
        self._samples = 0
        self._rate = 0
        self._tone_on = memory.conditioning
        self._context_turns = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSStartedFrame):
            await self._reply_started()
        elif isinstance(frame, TTSAudioRawFrame) and self._open:
            if self._first_audio is None:
                await self._first_chunk(frame)
            self._samples += len(frame.audio) // 2 // max(frame.num_channels, 1)
            self._rate = frame.sample_rate
        elif isinstance(frame, AggregatedTextFrame) and not isinstance(frame, TTSTextFrame):
            (self._bot_text if self._open else self._next_text).append(frame.text)
        elif isinstance(frame, (TTSStoppedFrame, InterruptionFrame)) and self._open:
            await self._reply_done(interrupted=isinstance(frame, InterruptionFrame))
        await self.push_frame(frame, direction)

    async def _reply_started(self) -> None:
        self._turn += 1
        self._open, self._started, self._first_audio = True, time.monotonic(), None
        self._user_text, self._user_stopped = self._controls.take_answered_turn()
        self._bot_text, self._next_text = self._next_text, []
        self._samples, self._rate = 0, 0
        context = self._memory.context()
        self._tone_on, self._context_turns = self._memory.conditioning, len(context)
        if self._tone_on:
            turns = ", ".join(
                f"{'user' if seg.speaker == self._memory.user_speaker else 'agent'} "
                f"{len(seg.audio) / seg.sample_rate:.1f} s {seg.text[:40]!r}"
                for seg in context
            )
            log.info("reply conditioned on: %s", turns or "nothing yet (first turn)")
        else:
            log.info("reply conditioned on: nothing (tone conditioning off)")

    async def _first_chunk(self, frame: TTSAudioRawFrame) -> None:
        self._first_audio = time.monotonic()
        log.info("MisoTTS audio streaming: %d Hz, %d channel(s)", frame.sample_rate, frame.num_channels)
        await self._send("speaking")

    async def _reply_done(self, interrupted: bool) -> None:
        self._open = False
        self._next_text = []
        if self._rate:
            log.info("MisoTTS spoke %.2f s of audio at %d Hz", self._samples / self._rate, self._rate)
        await self._send("interrupted" if interrupted else "done")

    async def _send(self, stage: str) -> None:
        after_user = None
        if self._first_audio is not None and self._user_stopped is not None:
            after_user = round(self._first_audio - self._user_stopped, 3)
        tts_first = None if self._first_audio is None else round(self._first_audio - self._started, 3)
        data = {
            "type": TURN_MESSAGE,
            "turn": self._turn,
            "stage": stage,
            "user": self._user_text,
            "bot": " ".join(t.strip() for t in self._bot_text if t.strip()) or None,
            "first_audio_after_user_s": after_user,
            "tts_first_audio_s": tts_first,
            "audio_s": round(self._samples / self._rate, 2) if self._rate else 0.0,
            "tone_conditioning": self._tone_on,
            "context_turns": self._context_turns,
        }
        await self.push_frame(RTVIServerMessageFrame(data=data))


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

"""The user's side of a Pipecat conversation, fed into the service's turn memory.

Audio, turn start and stop, and transcripts reach the service (or its tap, for pipelines that drop
input audio before the TTS) as frames; :class:`UserTurnCapture` takes each once. Which frames carry
what in Pipecat 1.14: docs/pipecat.md.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    LLMContextUserTurnFrame,
    TranscriptionFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from misotts_agents.engine.memory import ConversationMemory

if TYPE_CHECKING:
    from misotts_agents.pipecat.tts import MisoTTSService


class UserTurnCapture:
    """Feeds the user's side of the conversation into the memory, from the service or its tap.

    The same frames may reach both the tap and the service: audio is taken from the first processor
    that delivers any (the tap, which sits upstream), transcripts are de-duplicated by frame id, and
    turn frames and transcripts are taken once (by frame id, or their broadcast sibling's).
    """

    def __init__(self, memory: ConversationMemory) -> None:
        self.memory = memory
        self.audio_source: object | None = None
        self._seen: deque[int] = deque(maxlen=64)
        self._transcribed = False  # a TranscriptionFrame fed this turn's text already

    def _first_time(self, frame: Frame) -> bool:
        # The same frame passes the tap and the service; a broadcast's two copies are siblings.
        if frame.id in self._seen or (
            frame.broadcast_sibling_id is not None and frame.broadcast_sibling_id in self._seen
        ):
            return False
        self._seen.append(frame.id)
        return True

    def audio(self, frame: InputAudioRawFrame, source: object) -> None:
        if self.audio_source is None:
            self.audio_source = source
        if source is self.audio_source and frame.audio:
            self.memory.push_user_audio(frame.audio, frame.sample_rate, frame.num_channels)

    def started(self, frame: Frame) -> None:
        if self._first_time(frame) and self.memory.enabled:
            self._transcribed = False
            self.memory.user_started_speaking()

    def stopped(self, frame: Frame) -> None:
        if self._first_time(frame):
            self.memory.user_stopped_speaking()

    def transcription(self, frame: TranscriptionFrame) -> None:
        if self._first_time(frame) and self.memory.enabled:
            self._transcribed = True
            self.memory.add_user_transcript(frame.text)

    def user_turn(self, frame: LLMContextUserTurnFrame) -> None:
        # The user aggregator's text of the whole turn; used unless transcriptions already gave it.
        if self._first_time(frame) and not self._transcribed and self.memory.enabled:
            self.memory.add_user_transcript(frame.text)

    def handle(self, frame: Frame, direction: FrameDirection, source: object) -> None:
        if isinstance(frame, InputAudioRawFrame):
            if direction == FrameDirection.DOWNSTREAM:
                self.audio(frame, source)
        elif isinstance(frame, UserStartedSpeakingFrame):
            self.started(frame)
        elif isinstance(frame, UserStoppedSpeakingFrame):
            self.stopped(frame)
        elif isinstance(frame, TranscriptionFrame):
            self.transcription(frame)
        elif isinstance(frame, LLMContextUserTurnFrame):
            self.user_turn(frame)


class MisoUserAudioTap(FrameProcessor):
    """Taps the user's audio into a :class:`MisoTTSService`'s turn memory; passes every frame on.

    Place it right after ``transport.input()`` (make it with ``tts.user_audio_tap()``). It is only
    needed when input audio does not reach the TTS on its own: a processor between the transport and
    the TTS that drops ``InputAudioRawFrame`` (the stock STT services, user aggregator and LLM services
    forward it), or ``audio_passthrough=False`` on the STT. Turn start/stop frames reach it going
    upstream (the user aggregator broadcasts them both ways); VAD lag is covered by the pre-roll.
    """

    def __init__(self, service: MisoTTSService, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._service = service

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if self._service.tone_conditioning:
            self._service._capture.handle(frame, direction, self)
        await self.push_frame(frame, direction)

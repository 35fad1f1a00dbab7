"""Turn memory: what was said and how it sounded, turned into prompt segments.

Framework-agnostic (the Pipecat service and the LiveKit plugin both feed it). It keeps:

- the user's turns: audio captured from "user started speaking" to "user stopped speaking", with
  a pre-roll of the audio heard just before the start (voice-activity detectors fire late), and the
  transcript that arrives with or after the stop;
- the agent's turns: the audio it generated and the text, cut to what was actually *played* when
  the user barged in (playback runs at real time from the first chunk, so the played part is the
  audio that fits in the wall time between the first chunk and the interruption; the transcript is
  cut at the same fraction, to a word boundary);
- an optional voice prompt, which fixes the agent's voice and is cached by the engine.

``context()`` returns the most recent ``max_turns`` complete turns, oldest first: the reply is
conditioned on the user's tone and on the agent's own earlier delivery. Everything is bounded:
audio per turn (``max_turn_s``), turns kept (``max_turns``), the pre-roll buffer.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import soxr

from misotts_agents.audio import SAMPLE_RATE, to_mono
from misotts_agents.engine.request import Segment
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.errors import InvalidRequest


@dataclass
class _Turn:
    speaker: int
    text: str
    audio: np.ndarray  # 24 kHz mono float32


class _AudioBuffer:
    """Float32 24 kHz audio appended in pieces, capped at ``max_samples`` (older audio dropped)."""

    def __init__(self, max_samples: int) -> None:
        self.max_samples = max_samples
        self._pieces: deque[np.ndarray] = deque()
        self._size = 0

    def append(self, pcm: np.ndarray) -> None:
        self._pieces.append(pcm)
        self._size += pcm.size
        while self._pieces and self._size - self._pieces[0].size >= self.max_samples:  # max_samples may be 0
            self._size -= self._pieces.popleft().size

    def take(self) -> np.ndarray:
        audio = np.concatenate(self._pieces) if self._pieces else np.zeros(0, dtype=np.float32)
        self.clear()
        return audio[-self.max_samples :] if self.max_samples else audio[:0]

    def clear(self) -> None:
        self._pieces.clear()
        self._size = 0

    def peek(self) -> np.ndarray:
        """The audio so far, without taking it."""
        audio = np.concatenate(self._pieces) if self._pieces else np.zeros(0, dtype=np.float32)
        return audio[-self.max_samples :] if self.max_samples else audio[:0]

    @property
    def seconds(self) -> float:
        return self._size / SAMPLE_RATE


def cut_text(text: str, fraction: float) -> str:
    """The first ``fraction`` of ``text``, ending at a word boundary (what was heard before a cut)."""
    if fraction >= 1.0:
        return text
    words = text.split()
    keep = int(len(words) * max(fraction, 0.0))
    return " ".join(words[:keep])


class ConversationMemory:
    """Bounded memory of one conversation's turns, for tone conditioning. Thread-safe."""

    def __init__(
        self,
        *,
        agent_speaker: int = 0,
        user_speaker: int = 1,
        max_turns: int = 4,
        max_turn_s: float = 20.0,
        pre_roll_s: float = 0.5,
        voice: VoicePrompt | None = None,
        enabled: bool = True,
    ) -> None:
        if max_turns < 0 or max_turn_s <= 0 or pre_roll_s < 0:
            raise ValueError("max_turns >= 0, max_turn_s > 0 and pre_roll_s >= 0 are required")
        self.agent_speaker = agent_speaker
        self.user_speaker = user_speaker
        self.max_turns = max_turns
        self.max_turn_s = max_turn_s
        self.voice = voice
        self.enabled = enabled
        self.clock = time.monotonic  # what an interrupted turn's "heard so far" is measured with
        self._turns: deque[_Turn] = deque(maxlen=max(max_turns, 1))
        self._lock = threading.Lock()
        self._pre_roll = _AudioBuffer(int(pre_roll_s * SAMPLE_RATE))
        self._user = _AudioBuffer(int(max_turn_s * SAMPLE_RATE))
        self._user_speaking = False
        self._resampler: tuple[int, soxr.ResampleStream] | None = None
        self._user_audio: np.ndarray | None = None  # the last finished user turn, waiting for its transcript
        self._user_text: list[str] = []
        self._agent: _AudioBuffer | None = None
        self._agent_text = ""
        self._agent_first_audio_at: float | None = None
        self._agent_samples = 0

    # -- the user -----------------------------------------------------------------------------

    def push_user_audio(self, pcm: np.ndarray | bytes, sample_rate: int, num_channels: int = 1) -> None:
        """Every input frame, speaking or not (silence feeds the pre-roll). int16 bytes or floats."""
        if not self.enabled:
            return
        if isinstance(pcm, (bytes, bytearray, memoryview)):
            pcm = np.frombuffer(pcm, dtype=np.int16)
            if num_channels > 1:
                pcm = pcm.reshape(-1, num_channels)
        if np.asarray(pcm).size == 0:
            return
        audio = to_mono(pcm, sample_rate, what="user audio", resample=False)
        with self._lock:
            if sample_rate != SAMPLE_RATE:
                # One resampler for the whole input stream: resampling each 10-20 ms frame on its
                # own would leave a discontinuity at every frame boundary of the audio Mimi encodes.
                if self._resampler is None or self._resampler[0] != sample_rate:
                    self._resampler = (sample_rate, soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32"))
                audio = self._resampler[1].resample_chunk(audio)
            (self._user if self._user_speaking else self._pre_roll).append(audio)

    def user_started_speaking(self) -> None:
        with self._lock:
            if self._user_speaking:
                return
            self._user_speaking = True
            self._user.clear()
            self._user.append(self._pre_roll.take())
            self._user_audio = None
            self._user_text = []

    def user_stopped_speaking(self) -> None:
        with self._lock:
            if not self._user_speaking:
                return
            self._user_speaking = False
            self._user_audio = self._user.take()
            self._commit_user()

    def add_user_transcript(self, text: str) -> None:
        """A final transcript of the user's turn (may come before or after the stop; pieces are joined)."""
        text = text.strip()
        if not text:
            return
        with self._lock:
            self._user_text.append(text)
            self._commit_user()

    def _commit_user(self) -> None:
        # A user turn enters the memory once both its audio and some transcript are known; later
        # transcript pieces of the same turn extend it.
        if self._user_audio is None or not self._user_text or self._user_speaking:
            return
        text = " ".join(self._user_text)
        if self._turns and self._turns[-1].speaker == self.user_speaker and self._turns[-1].audio is self._user_audio:
            self._turns[-1].text = text
        elif self._user_audio.size:
            self._turns.append(_Turn(self.user_speaker, text, self._user_audio))

    def add_turn(self, speaker: int, text: str, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
        """A whole turn known at once (a server session is told each user turn after it ends)."""
        text = text.strip()
        if not text:
            raise InvalidRequest("a turn needs its transcript")
        audio = to_mono(audio, sample_rate, what="turn audio")
        if self.enabled:
            with self._lock:
                self._turns.append(_Turn(speaker, text, audio[-int(self.max_turn_s * SAMPLE_RATE) :]))

    # -- the agent ----------------------------------------------------------------------------

    def agent_started(self, text: str) -> None:
        """A new agent utterance (the text being spoken)."""
        with self._lock:
            self._agent = _AudioBuffer(int(self.max_turn_s * SAMPLE_RATE))
            self._agent_text = text
            self._agent_first_audio_at = None
            self._agent_samples = 0  # all generated, including what exceeds max_turn_s

    def agent_add_text(self, text: str) -> None:
        """More text for the current utterance (a reply spoken sentence by sentence); no-op if none."""
        text = text.strip()
        with self._lock:
            if self._agent is not None and text:
                self._agent_text = f"{self._agent_text} {text}".strip()

    @property
    def agent_speaking(self) -> bool:
        """True between ``agent_started`` and ``agent_finished``."""
        return self._agent is not None

    def current_agent_segment(self) -> Segment | None:
        """The utterance in progress (its text so far and the audio generated for it), or None.

        A reply spoken sentence by sentence conditions each sentence on the earlier ones.
        """
        if not self.enabled:
            return None
        with self._lock:
            if self._agent is None or not self._agent_text:
                return None
            audio = self._agent.peek()
            text = self._agent_text
        if not audio.size:
            return None
        return Segment(self.agent_speaker, text, audio, SAMPLE_RATE)

    def push_agent_audio(self, pcm: np.ndarray) -> None:
        """Audio of the current utterance (24 kHz float32), as it is sent out for playback."""
        with self._lock:
            if self._agent is None:
                return
            if self._agent_first_audio_at is None:
                self._agent_first_audio_at = self.clock()
            pcm = np.asarray(pcm, dtype=np.float32)
            room = self._agent.max_samples - self._agent_samples
            if room > 0:  # keep the beginning: that is what the listener heard first
                self._agent.append(pcm[:room])
            self._agent_samples += pcm.size

    def agent_finished(self, interrupted: bool = False) -> None:
        """End of the utterance; on an interruption, keep only what was played by now."""
        with self._lock:
            if self._agent is None:
                return
            total = self._agent_samples / SAMPLE_RATE
            audio = self._agent.take()
            heard = total
            if interrupted:
                played = 0.0 if self._agent_first_audio_at is None else self.clock() - self._agent_first_audio_at
                heard = min(played, total)
            audio = audio[: int(heard * SAMPLE_RATE)]
            # The transcript follows the audio kept: cut at an interruption and at the max_turn_s cap.
            text = cut_text(self._agent_text, audio.size / SAMPLE_RATE / total if total else 0.0)
            self._agent = None
            if self.enabled and audio.size and text:
                self._turns.append(_Turn(self.agent_speaker, text, audio))

    # -- what the next reply is conditioned on -----------------------------------------------

    def context(self) -> tuple[Segment, ...]:
        if not self.enabled or not self.max_turns:
            return ()
        with self._lock:
            turns = list(self._turns)[-self.max_turns :]
        return tuple(Segment(t.speaker, t.text, t.audio, SAMPLE_RATE) for t in turns)

    def clear(self) -> None:
        with self._lock:
            self._turns.clear()
            self._user.clear()
            self._pre_roll.clear()
            self._user_audio = None
            self._user_text = []
            self._agent = None

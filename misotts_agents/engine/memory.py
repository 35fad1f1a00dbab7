"""Turn memory: what was said and how it sounded, turned into prompt segments.

Framework-agnostic (the Pipecat service, the LiveKit plugin and the server's sessions feed it). It
keeps:

- the user's turns: audio captured from "user started speaking" to "user stopped speaking", with
  a pre-roll of the audio heard just before the start (voice-activity detectors fire late), and the
  transcript that arrives with or after the stop. A turn still in progress enters the context only
  when a preliminary ("preflight") transcript was given for it: a reply generated before the turn
  is confirmed is conditioned on the audio and words so far;
- the agent's turns: the audio it generated and the words of its text, cut to what was actually
  *heard* when the user barged in. The heard part is the audio played by then: given by the
  framework (``heard_s``) or kept by a :class:`~misotts_agents.engine.playout.PlayoutClock` (audio
  handed over less audio still queued, whether generation ran ahead of playback or behind it). The
  words kept are those whose start (the engine's word timings, engine/words.py) falls in that audio,
  so the turn's audio and text always describe the same span;
- an optional voice prompt, which fixes the agent's voice and is cached by the engine.

A user turn that ends while the agent's turn is still open (interruptions off: the agent talks on)
is placed after that agent turn, which is kept whole: only an interruption cuts an agent turn.

``context()`` returns the most recent ``max_turns`` complete turns, oldest first: the reply is
conditioned on the user's tone and on the agent's own earlier delivery. Everything is bounded:
audio per turn (``max_turn_s``), turns kept (``max_turns``), the pre-roll buffer.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import soxr

from misotts_agents.audio import SAMPLE_RATE, to_mono
from misotts_agents.engine.playout import PlayoutClock
from misotts_agents.engine.request import Segment
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.engine.words import WordAligner, WordTiming, heard_text
from misotts_agents.errors import InvalidRequest


@dataclass
class _Turn:
    speaker: int
    text: str
    audio: np.ndarray  # 24 kHz mono float32


@dataclass
class _Sentence:
    """One request's part of the agent's turn."""

    text: str
    offset_s: float  # where its audio starts in the turn
    duration_s: float = 0.0  # audio generated for it
    words: list[WordTiming] = field(default_factory=list)  # the engine's timings (from its own start)

    def timed_words(self, complete: bool) -> list[tuple[float, str]]:
        """(start in the turn, word): the engine's timings, or estimated here when none came (an
        engine or stream without word timings); ``complete``: the sentence was spoken to its end."""
        words = self.words
        if not words and self.duration_s:
            words = list(WordAligner(self.text).advance(self.duration_s, ended=complete))
        return [(self.offset_s + w.start_s, w.word) for w in words]


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
        self._user_turn: _Turn | None = None  # the user turn once committed (later transcript pieces extend it)
        self._user_preflight: str | None = None  # a preliminary transcript of the turn in progress
        self._deferred: list[_Turn] = []  # user turns that ended while the agent's turn was open
        self._agent: _AudioBuffer | None = None
        self._agent_samples = 0
        self._sentences: list[_Sentence] = []
        self._playout = PlayoutClock(self._now)

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
            self._user_turn = None
            self._user_preflight = None

    def user_stopped_speaking(self) -> None:
        with self._lock:
            if not self._user_speaking:
                return
            self._user_speaking = False
            if self._resampler is not None:
                # The resampler holds back its last few ms: they belong to this turn, not the next.
                self._user.append(self._resampler[1].resample_chunk(np.zeros(0, dtype=np.float32), last=True))
                self._resampler[1].clear()
            self._user_audio = self._user.take()
            self._commit_user()

    def user_preflight_transcript(self, text: str = "") -> None:
        """A preliminary transcript of the turn in progress: the words after its final transcript
        pieces so far ("" when the finals are all there is). Until the turn is committed,
        ``context()`` ends with the turn's audio so far and its words so far, so a reply generated
        before the turn is confirmed (preemptive generation) is conditioned on it."""
        with self._lock:
            if self._user_turn is None:
                self._user_preflight = text.strip()

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
        if self._user_turn is not None:
            self._user_turn.text = text
        elif self._user_audio.size:
            self._user_turn = _Turn(self.user_speaker, text, self._user_audio)
            self._user_preflight = None
            self._append(self._user_turn)

    def _append(self, turn: _Turn) -> None:
        # A turn that ends while the agent is still speaking comes after the agent's turn.
        if self._agent is not None and turn.speaker != self.agent_speaker:
            self._deferred.append(turn)
        else:
            self._turns.append(turn)

    def _pending_user(self) -> Segment | None:
        """The user turn in progress, when a preflight transcript was given for it."""
        if self._user_preflight is None or self._user_turn is not None:
            return None
        text = " ".join([*self._user_text, self._user_preflight]).strip()
        audio = self._user.peek() if self._user_speaking else self._user_audio
        if not text or audio is None or not audio.size:
            return None
        return Segment(self.user_speaker, text, audio, SAMPLE_RATE)

    def add_turn(self, speaker: int, text: str, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
        """A whole turn known at once (a server session is told each user turn after it ends)."""
        text = text.strip()
        if not text:
            raise InvalidRequest("a turn needs its transcript")
        audio = to_mono(audio, sample_rate, what="turn audio")
        if self.enabled:
            with self._lock:
                self._append(_Turn(speaker, text, audio[-int(self.max_turn_s * SAMPLE_RATE) :]))

    # -- the agent ----------------------------------------------------------------------------

    def _now(self) -> float:
        return self.clock()

    def agent_started(self, text: str = "") -> None:
        """A new agent turn (a reply), with the text of its first request if known. A turn still
        open is finished first, whole (only an interruption cuts a turn)."""
        with self._lock:
            if self._agent is not None:
                self._finish(interrupted=False, heard_s=None)
            self._agent = _AudioBuffer(int(self.max_turn_s * SAMPLE_RATE))
            self._agent_samples = 0  # all generated, including what exceeds max_turn_s
            self._sentences = []
            self._playout = PlayoutClock(self._now)
        if text:
            self.agent_add_text(text)

    def agent_add_text(self, text: str) -> None:
        """The text of the turn's next request (a reply spoken sentence by sentence): its audio and
        word timings follow with ``push_agent_audio``. No-op without an open turn."""
        text = text.strip()
        with self._lock:
            if self._agent is None or not text:
                return
            if self._sentences and not self._sentences[-1].duration_s:
                self._sentences.pop()  # the previous request produced no audio: nothing of it was heard
            offset = self._agent_samples / SAMPLE_RATE
            if offset < self.max_turn_s:  # beyond the kept audio its words could never be kept
                self._sentences.append(_Sentence(text, offset))

    @property
    def agent_speaking(self) -> bool:
        """True between ``agent_started`` and ``agent_finished``."""
        return self._agent is not None

    def current_agent_segment(self) -> Segment | None:
        """The turn in progress (its requests so far: their words and audio), or None.

        A reply spoken sentence by sentence conditions each sentence on the earlier ones.
        """
        if not self.enabled:
            return None
        with self._lock:
            if self._agent is None:
                return None
            audio = self._agent.peek()
            text = self._heard_text(audio.size / SAMPLE_RATE, complete=True)
        if not audio.size or not text:
            return None
        return Segment(self.agent_speaker, text, audio, SAMPLE_RATE)

    def push_agent_audio(self, pcm: np.ndarray, words: Sequence[WordTiming] = ()) -> None:
        """Audio of the current request (24 kHz float32) as it is sent out for playback, with the
        words it covers (``AudioChunk.words``: timed from the request's start)."""
        pcm = np.asarray(pcm, dtype=np.float32)
        with self._lock:
            if self._agent is None:
                return
            if not self._sentences:  # audio without agent_add_text: one request, text unknown
                self._sentences.append(_Sentence("", self._agent_samples / SAMPLE_RATE))
            sentence = self._sentences[-1]
            if self._agent_samples / SAMPLE_RATE < self.max_turn_s:
                sentence.words.extend(words)
            sentence.duration_s += pcm.size / SAMPLE_RATE
            room = self._agent.max_samples - self._agent_samples
            if room > 0:  # keep the beginning: that is what the listener heard first
                self._agent.append(pcm[:room])
            self._agent_samples += pcm.size
            self._playout.push(pcm.size / SAMPLE_RATE)

    def agent_heard_s(self) -> float:
        """How much of the open turn has been played by now (0 when none is open)."""
        with self._lock:
            return self._playout.heard_s() if self._agent is not None else 0.0

    def agent_finished(self, interrupted: bool = False, heard_s: float | None = None) -> None:
        """End of the turn. On an interruption only what was heard is kept: ``heard_s`` seconds of
        audio when the framework knows the playback position, else what the playout clock says was
        played by now; the words kept are those that started within the audio kept."""
        with self._lock:
            self._finish(interrupted, heard_s)

    def _finish(self, interrupted: bool, heard_s: float | None) -> None:
        if self._agent is None:
            return
        total = self._agent_samples / SAMPLE_RATE
        heard = total
        if interrupted:
            heard = min(total, self._playout.heard_s() if heard_s is None else max(heard_s, 0.0))
        audio = self._agent.take()[: round(heard * SAMPLE_RATE)]
        text = self._heard_text(audio.size / SAMPLE_RATE, complete=not interrupted)
        self._agent = None
        self._sentences = []
        if self.enabled and audio.size and text:
            self._turns.append(_Turn(self.agent_speaker, text, audio))
        for turn in self._deferred:
            self._turns.append(turn)
        self._deferred = []

    def _heard_text(self, heard_s: float, complete: bool) -> str:
        """The turn's words that started within ``heard_s`` seconds of its audio; ``complete``: its
        last request was spoken to its end (else its words are estimated as still going)."""
        words: list[tuple[float, str]] = []
        for i, sentence in enumerate(self._sentences):
            words += sentence.timed_words(complete or i < len(self._sentences) - 1)
        return heard_text(words, heard_s)

    # -- what the next reply is conditioned on -----------------------------------------------

    def context(self) -> tuple[Segment, ...]:
        if not self.enabled or not self.max_turns:
            return ()
        with self._lock:
            segments = [Segment(t.speaker, t.text, t.audio, SAMPLE_RATE) for t in self._turns]
            pending = self._pending_user()
        if pending is not None:
            segments.append(pending)
        return tuple(segments[-self.max_turns :])

    def reply_context(
        self,
        turns: Sequence[Segment] | None = None,
        reply: Sequence[Segment] | None = None,
        max_turns: int | None = None,
    ) -> tuple[Segment, ...]:
        """What the next sentence of a reply is conditioned on: the turns before it (``turns``, by
        default :meth:`context`) then the reply so far, so later sentences hear the earlier ones
        (``reply``: the caller's own record of it, by default the open agent turn as one segment);
        only the last ``max_turns`` segments when given."""
        if reply is None:
            current = self.current_agent_segment()
            reply = (current,) if current is not None else ()
        segments = (*(self.context() if turns is None else turns), *reply)
        if max_turns is None:
            return segments
        return segments[-max_turns:] if max_turns else ()

    def clear(self) -> None:
        with self._lock:
            self._turns.clear()
            self._user.clear()
            self._pre_roll.clear()
            self._user_audio = None
            self._user_text = []
            self._user_turn = None
            self._user_preflight = None
            self._deferred = []
            self._agent = None
            self._sentences = []

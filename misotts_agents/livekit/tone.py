"""Tone conditioning for LiveKit sessions: the user's last turn (audio + transcript) and the agent's
own heard turns, kept per :class:`AgentSession` so agent handoffs do not lose them.

One line turns it on::

    class MyAgent(MisoToneMixin, Agent): ...

The mixin tees every raw input frame the agent's ``stt_node`` sees into the session's
:class:`ToneTracker` (speech start/stop, preflight and final transcripts come from the same STT
events, and from the session's VAD-driven ``user_state_changed``), and marks its ``tts_node`` so the
MisoTTS streams it creates find the tracker.

The agent's side: each MisoTTS stream (one speech segment) records its sentences, their audio and
their word timings. LiveKit plays one segment after another and reports each one's end
(``playback_finished`` on the session's audio output) with the position played: a segment enters
the memory when it has played, and an interrupted one is cut at that position, its text to the
words that started before it (so the turn's audio and text describe the same span, whether
generation was ahead of playback or behind it). The turn closes when the speech ends (its message
reaches the chat, or the agent stops speaking).
"""

from __future__ import annotations

import contextvars
import inspect
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents import llm, stt
from livekit.agents.voice import AgentSession, ModelSettings

from misotts_agents.audio import SAMPLE_RATE
from misotts_agents.engine.memory import ConversationMemory
from misotts_agents.engine.words import WordAligner, WordTiming

_current: contextvars.ContextVar[ToneTracker | None] = contextvars.ContextVar("misotts_tone_tracker", default=None)
_trackers: weakref.WeakKeyDictionary[AgentSession, ToneTracker] = weakref.WeakKeyDictionary()
_lock = threading.Lock()

# Segments generated but not played yet (LiveKit plays one at a time; more wait only briefly).
MAX_PENDING_SEGMENTS = 16


def current_tracker() -> ToneTracker | None:
    """The tracker of the session whose ``tts_node`` is running in this task, if any."""
    return _current.get()


@dataclass
class _Sentence:
    text: str
    audio: list[np.ndarray] = field(default_factory=list)
    words: list[WordTiming] = field(default_factory=list)


@dataclass(eq=False)
class SpokenSegment:
    """What one TTS stream attempt generated: its sentences, their audio and word timings."""

    sentences: list[_Sentence] = field(default_factory=list)

    def sentence(self, text: str) -> None:
        self.sentences.append(_Sentence(text))

    def audio(self, pcm: np.ndarray, words: Sequence[WordTiming]) -> None:
        if self.sentences:
            self.sentences[-1].audio.append(np.asarray(pcm, dtype=np.float32))
            self.sentences[-1].words.extend(words)

    @property
    def seconds(self) -> float:
        return sum(p.size for s in self.sentences for p in s.audio) / SAMPLE_RATE

    def played(self, seconds: float) -> list[tuple[str, np.ndarray, list[WordTiming]]]:
        """Its first ``seconds`` of audio, sentence by sentence, with the words that start in them."""
        out = []
        left = seconds
        for sentence in self.sentences:
            audio = np.concatenate(sentence.audio) if sentence.audio else np.zeros(0, dtype=np.float32)
            take = audio[: round(min(left, audio.size / SAMPLE_RATE) * SAMPLE_RATE)]
            if not take.size:
                break
            words = sentence.words
            if not words:  # an engine without word timings: estimate them here
                whole = take.size == audio.size
                words = list(WordAligner(sentence.text).advance(audio.size / SAMPLE_RATE, ended=whole))
            out.append((sentence.text, take, [w for w in words if w.start_s < take.size / SAMPLE_RATE]))
            left -= take.size / SAMPLE_RATE
        return out


class ToneTracker:
    """Feeds one session's :class:`ConversationMemory` from LiveKit's frames and events."""

    def __init__(self, session: AgentSession, memory: ConversationMemory | None = None) -> None:
        self.memory = memory if memory is not None else ConversationMemory()
        self._session = session
        self._pending: deque[SpokenSegment] = deque()  # generated, in playback order, not played yet
        self._plock = threading.Lock()
        self._outputs: weakref.WeakSet[Any] = weakref.WeakSet()  # audio outputs we listen to
        session.on("conversation_item_added", self._on_item_added)
        session.on("agent_state_changed", self._on_agent_state)
        session.on("user_state_changed", self._on_user_state)
        session.on("close", lambda _ev: self._close())

    @classmethod
    def for_session(cls, session: AgentSession, memory: ConversationMemory | None = None) -> ToneTracker:
        """The session's tracker, made on first use (``memory`` is used only then)."""
        with _lock:
            tracker = _trackers.get(session)
            if tracker is None:
                tracker = _trackers[session] = cls(session, memory)
            return tracker

    def activate(self) -> None:
        """Make MisoTTS streams created from now on in this task use this tracker, and follow the
        playback of the session's audio output (it may have been set or replaced since)."""
        _current.set(self)
        output = self._session.output.audio
        if output is not None and output not in self._outputs:
            self._outputs.add(output)
            output.on("playback_finished", self._on_playback_finished)

    # -- the user -----------------------------------------------------------------------------

    def user_audio(self, frame: rtc.AudioFrame) -> None:
        self.memory.push_user_audio(bytes(frame.data.cast("B")), frame.sample_rate, frame.num_channels)

    def speech_event(self, ev: stt.SpeechEvent) -> None:
        if ev.type == stt.SpeechEventType.START_OF_SPEECH:
            self.memory.user_started_speaking()
        elif ev.type == stt.SpeechEventType.END_OF_SPEECH:
            self.memory.user_stopped_speaking()
        elif ev.type == stt.SpeechEventType.FINAL_TRANSCRIPT and ev.alternatives:
            self.memory.add_user_transcript(ev.alternatives[0].text)
            self.memory.user_preflight_transcript()  # a reply started before the turn ends hears it
        elif ev.type == stt.SpeechEventType.PREFLIGHT_TRANSCRIPT and ev.alternatives:
            self.memory.user_preflight_transcript(ev.alternatives[0].text)

    def _on_user_state(self, ev: Any) -> None:
        if ev.new_state == "speaking":
            self.memory.user_started_speaking()
        elif ev.old_state == "speaking":
            self.memory.user_stopped_speaking()

    # -- the agent ----------------------------------------------------------------------------

    def begin_segment(self) -> SpokenSegment:
        """A TTS stream attempt starts: its audio will play as the next segment."""
        segment = SpokenSegment()
        with self._plock:
            self._pending.append(segment)
            while len(self._pending) > MAX_PENDING_SEGMENTS:  # nobody reports playback: keep the newest
                self._pending.popleft()
        return segment

    def discard(self, segment: SpokenSegment) -> None:
        """A failed attempt: its audio is not what plays (a retry starts a segment of its own)."""
        with self._plock:
            if segment in self._pending:
                self._pending.remove(segment)

    def _on_playback_finished(self, ev: Any) -> None:
        with self._plock:
            while self._pending and not self._pending[0].seconds:
                self._pending.popleft()  # produced no audio: never played
            if not self._pending:
                return
            segment = self._pending.popleft()
            if ev.interrupted:  # the rest was cancelled with it and never plays
                self._pending.clear()
        # Only what played enters the memory: LiveKit reports the position reached, which is less
        # than what was generated after an interruption (or when it stopped forwarding audio).
        memory = self.memory
        if not memory.agent_speaking:
            memory.agent_started()
        for text, audio, words in segment.played(max(float(ev.playback_position), 0.0)):
            memory.agent_add_text(text)
            memory.push_agent_audio(audio, words)
        if ev.interrupted:
            memory.agent_finished()

    def _on_item_added(self, ev: Any) -> None:
        msg = ev.item
        if isinstance(msg, llm.ChatMessage) and msg.role == "assistant":
            self.memory.agent_finished()  # the speech is over (an interrupted one is closed already)

    def _on_agent_state(self, ev: Any) -> None:
        if ev.old_state == "speaking":
            self.memory.agent_finished()

    def _close(self) -> None:
        with self._plock:
            self._pending.clear()
        self.memory.clear()


def tone_for(session: AgentSession, tts: Any = None) -> ToneTracker:
    """The session's tone tracker; uses ``tts.memory`` (an explicit memory) when it has one."""
    memory = getattr(tts, "memory", None)
    return ToneTracker.for_session(session, memory if isinstance(memory, ConversationMemory) else None)


class MisoToneMixin:
    """Mix into an ``Agent`` (``class MyAgent(MisoToneMixin, Agent)``) to condition MisoTTS on the
    user's last turn and the agent's earlier turns. The memory lives on the session, so every agent
    of a handoff chain that uses the mixin shares it."""

    def _miso_tracker(self) -> ToneTracker:
        session = self.session  # type: ignore[attr-defined]
        agent_tts = self.tts  # type: ignore[attr-defined]
        return tone_for(session, agent_tts if agent_tts else session.tts)

    async def stt_node(self, audio: AsyncIterable[rtc.AudioFrame], model_settings: ModelSettings) -> Any:
        tracker = self._miso_tracker()

        async def tee() -> Any:
            async for frame in audio:
                tracker.user_audio(frame)
                yield frame

        events = super().stt_node(tee(), model_settings)  # type: ignore[misc]
        if inspect.isawaitable(events):
            events = await events
        if events is None:
            return
        async for ev in events:
            if isinstance(ev, stt.SpeechEvent):
                tracker.speech_event(ev)
            yield ev

    async def tts_node(self, text: AsyncIterable[str], model_settings: ModelSettings) -> Any:
        self._miso_tracker().activate()
        frames = super().tts_node(text, model_settings)  # type: ignore[misc]
        if inspect.isawaitable(frames):
            frames = await frames
        if frames is None:
            return
        async for frame in frames:
            yield frame

"""Tone conditioning for LiveKit sessions: the user's last turn (audio + transcript) and the agent's
own played turns, kept per :class:`AgentSession` so agent handoffs do not lose them.

One line turns it on::

    class MyAgent(MisoToneMixin, Agent): ...

The mixin tees every raw input frame the agent's ``stt_node`` sees into the session's
:class:`ToneTracker` (speech start/stop and final transcripts come from the same STT events, and
from the session's VAD-driven ``user_state_changed``), and marks its ``tts_node`` so the MisoTTS
streams it creates find the tracker. The agent's generated audio is kept until LiveKit adds the
spoken message to the chat (``conversation_item_added``): when that message is marked
``interrupted`` its audio is cut to the time it was actually played (``stopped_speaking_at -
started_speaking_at``), and its text is LiveKit's playback-synchronized transcript when available
(else cut at the same fraction).
"""

from __future__ import annotations

import contextvars
import inspect
import threading
import weakref
from collections.abc import AsyncIterable
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents import llm, stt
from livekit.agents.voice import AgentSession, ModelSettings

from misotts_agents.audio import SAMPLE_RATE
from misotts_agents.engine.memory import ConversationMemory, cut_text

_current: contextvars.ContextVar[ToneTracker | None] = contextvars.ContextVar("misotts_tone_tracker", default=None)
_trackers: weakref.WeakKeyDictionary[AgentSession, ToneTracker] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def current_tracker() -> ToneTracker | None:
    """The tracker of the session whose ``tts_node`` is running in this task, if any."""
    return _current.get()


class ToneTracker:
    """Feeds one session's :class:`ConversationMemory` from LiveKit's frames and events."""

    def __init__(self, session: AgentSession, memory: ConversationMemory | None = None) -> None:
        self.memory = memory if memory is not None else ConversationMemory()
        self._pending_audio: list[np.ndarray] = []
        self._pending_text: list[str] = []
        self._plock = threading.Lock()
        session.on("conversation_item_added", self._on_item_added)
        session.on("agent_state_changed", self._on_agent_state)
        session.on("user_state_changed", self._on_user_state)
        session.on("close", lambda _ev: self.memory.clear())

    @classmethod
    def for_session(cls, session: AgentSession, memory: ConversationMemory | None = None) -> ToneTracker:
        """The session's tracker, made on first use (``memory`` is used only then)."""
        with _lock:
            tracker = _trackers.get(session)
            if tracker is None:
                tracker = _trackers[session] = cls(session, memory)
            return tracker

    def activate(self) -> None:
        """Make MisoTTS streams created from now on in this task use this tracker."""
        _current.set(self)

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

    def _on_user_state(self, ev: Any) -> None:
        if ev.new_state == "speaking":
            self.memory.user_started_speaking()
        elif ev.old_state == "speaking":
            self.memory.user_stopped_speaking()

    # -- the agent ----------------------------------------------------------------------------

    def agent_audio(self, pcm: np.ndarray) -> None:
        with self._plock:
            self._pending_audio.append(np.asarray(pcm, dtype=np.float32))

    def agent_text(self, text: str) -> None:
        with self._plock:
            self._pending_text.append(text)

    def _take_pending(self) -> tuple[np.ndarray, str]:
        with self._plock:
            audio = np.concatenate(self._pending_audio) if self._pending_audio else np.zeros(0, np.float32)
            text = " ".join(self._pending_text)
            self._pending_audio, self._pending_text = [], []
        return audio, text

    def _on_item_added(self, ev: Any) -> None:
        msg = ev.item
        if not isinstance(msg, llm.ChatMessage) or msg.role != "assistant":
            return
        audio, generated_text = self._take_pending()
        if not audio.size:
            return
        text = msg.text_content or generated_text
        if msg.interrupted:
            started = msg.metrics.get("started_speaking_at")
            stopped = msg.metrics.get("stopped_speaking_at")
            total = audio.size / SAMPLE_RATE
            played = min(max(stopped - started, 0.0), total) if started and stopped else total
            audio = audio[: int(played * SAMPLE_RATE)]
            if text.strip() == generated_text.strip():  # not playback-synchronized: cut it ourselves
                text = cut_text(text, played / total if total else 0.0)
        self.memory.agent_started(text)
        self.memory.push_agent_audio(audio)
        self.memory.agent_finished(interrupted=False)  # already cut to what was played

    def _on_agent_state(self, ev: Any) -> None:
        # conversation_item_added comes before the agent goes back to listening: whatever is still
        # pending now was generated but never reached the chat (nothing played): drop it.
        if ev.new_state in ("listening", "idle"):
            self._take_pending()


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

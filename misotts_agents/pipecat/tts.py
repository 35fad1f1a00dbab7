"""MisoTTSService: the shared MisoTTS engine as a Pipecat (1.14) TTS service, with tone conditioning.

``run_tts`` streams each sentence's audio while the engine generates it, its words as they play, and
keeps the turn memory that conditions the next requests (capture.py feeds it the user's side). How
it uses Pipecat's frames, contexts and word timestamps: docs/pipecat.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import ErrorFrame, Frame, InterruptionFrame, StartFrame, TTSAudioRawFrame
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.utils.errors import ErrorCategory
from pipecat.utils.tracing.service_decorators import traced_tts

from misotts_agents.audio import SAMPLE_RATE
from misotts_agents.connect import server_connection
from misotts_agents.engine.audio_stream import AudioStream
from misotts_agents.engine.memory import ConversationMemory
from misotts_agents.engine.miso_engine import MisoEngine
from misotts_agents.engine.playout import PlayoutClock
from misotts_agents.engine.registry import shared_engine
from misotts_agents.engine.request import AudioChunk, Segment, SynthesisRequest
from misotts_agents.engine.stream import SpeechStream
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.errors import EngineClosed, InvalidRequest, MisoError, error_code
from misotts_agents.model.config import WeightFormat
from misotts_agents.model.sources import DEFAULT_MODEL
from misotts_agents.pipecat.capture import MisoUserAudioTap, UserTurnCapture
from misotts_agents.pipecat.settings import DEFAULT_VOICE, MisoTTSSettings, default_settings, settings_request

if TYPE_CHECKING:
    from misotts_agents.server.client import RemoteEngine


class MisoTTSService(TTSService):
    """MisoTTS (or Sesame CSM-1B) as a streaming Pipecat TTS service, in process or on a server.

    One engine serves every pipeline in the process: by default the service asks
    :func:`misotts_agents.engine.registry.shared_engine` for ``model`` (loaded once, on first use; load it
    before building pipelines, Pipecat's setup timeout is 20 s), or pass ``engine=``; with
    ``url="ws://host:8700"`` it runs its requests on a ``misotts-agents serve`` server instead (its own
    :class:`~misotts_agents.server.RemoteEngine`; ``token`` defaults to ``$MISOTTS_TOKEN``). Each
    service (one per pipeline) has its own :class:`ConversationMemory`.

    Audio streams while the engine generates, as 16-bit mono ``TTSAudioRawFrame`` at the pipeline's
    output rate; an ``InterruptionFrame`` cancels the engine request at its next frame step. With
    ``tone_conditioning`` each request's prompt holds the last ``max_turns`` turns of the
    conversation and the reply spoken so far; words are pushed with ``add_word_timestamps`` where
    their audio plays, so an interrupted reply leaves exactly the words heard. Text aggregation must
    be by sentence (``text_aggregation_mode=TOKEN`` is refused). How each of these works with
    Pipecat's frames: docs/pipecat.md.
    """

    Settings = MisoTTSSettings
    # Pipecat's services narrow the type of their settings this way (TTSService is not generic in it):
    # the service makes them from its own Settings class and updates them in place.
    _settings: MisoTTSSettings  # pyright: ignore[reportIncompatibleVariableOverride]

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        engine: MisoEngine | None = None,
        url: str | None = None,
        token: str | None = None,
        device: str | None = None,
        watermark: bool | str = True,
        weights: WeightFormat = "bf16",
        voice: VoicePrompt | None = None,
        memory: ConversationMemory | None = None,
        tone_conditioning: bool = True,
        max_turns: int = 4,
        settings: MisoTTSSettings | None = None,
        sample_rate: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Create the service.

        Args:
            model: local directory or Hub repo id of the checkpoint to load (default: MisoLabs/MisoTTS);
                with ``engine`` or ``url`` only the ``model`` setting's label (metrics), which then
                defaults to the engine's own model (``MisoEngine.model_name``) or the server's url.
            engine: an explicit (shared) engine instead of the process-wide one for ``model``.
            url: run on a ``misotts-agents serve`` server instead (``ws://host:port`` or ``http://...``);
                the service makes and owns a :class:`~misotts_agents.server.RemoteEngine`. Not with
                ``engine``.
            token: the server's bearer token (default: ``$MISOTTS_TOKEN``); used only with ``url``.
            device: device for the engine the service loads (default: CUDA when available).
            watermark: passed to the engine load: True (SilentCipher), a directory/repo, or False.
            weights: passed to the engine load: ``bf16``, ``int8`` or ``fp8`` linear layers.
            voice: voice prompt fixing the agent's voice (its prefill is cached by the engine);
                registered as ``"default"``.
            memory: the conversation memory to use (default: a new one for this service).
            tone_conditioning: feed the user's last turns and the agent's earlier turns into the prompt.
            max_turns: most conversation turns in each prompt.
            settings: initial settings (a delta over the defaults); ``ValueError`` when out of bounds.
            sample_rate: output rate; None follows the pipeline's ``audio_out_sample_rate``.
            **kwargs: passed to Pipecat's ``TTSService`` (except ``text_aggregation_mode=TOKEN``,
                refused: the model speaks whole sentences).
        """
        if max_turns < 0:
            raise ValueError(f"max_turns must be >= 0, got {max_turns}")
        remote = server_connection(engine, url, token)  # url=: the service's own connection
        if memory is None:
            memory = ConversationMemory(max_turns=max(max_turns, 1), voice=voice, enabled=tone_conditioning)
        voice = voice if voice is not None else memory.voice
        if model is not None:
            label = str(model)
        elif engine is not None:
            label = getattr(engine, "model_name", None) or DEFAULT_MODEL
        else:
            label = url if url is not None else DEFAULT_MODEL
        initial = default_settings(label, voice is not None)
        if settings is not None:
            initial.apply_update(settings)
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            push_text_frames=False,  # words are pushed as they are heard (add_word_timestamps)
            sample_rate=sample_rate,
            settings=initial,
            **kwargs,
        )
        if self._is_streaming_tokens:
            raise ValueError(
                "MisoTTSService needs whole sentences: the model speaks a whole text per request, and "
                "token fragments ('thi', 'ng. Yo') make it say nonsense. Keep the default "
                "text_aggregation_mode=TextAggregationMode.SENTENCE"
            )
        self._remote = remote  # closed in cleanup
        self._connect_task: asyncio.Task[None] | None = None
        self._engine: MisoEngine | RemoteEngine
        if remote is not None:
            self._engine = remote
        elif engine is not None:
            self._engine = engine
        else:
            # Only non-default options: ``MisoTTSService(model)`` then shares ``shared_engine(model)``.
            options: dict[str, Any] = {} if device is None else {"device": device}
            if watermark is not True:
                options["watermark"] = watermark
            if weights != "bf16":
                options["weights"] = weights
            self._engine = shared_engine(model if model is not None else DEFAULT_MODEL, **options)
        self._memory = memory
        self._capture = UserTurnCapture(memory)
        self._tone_conditioning = tone_conditioning
        self._max_turns = max_turns
        self._voices: dict[str, VoicePrompt] = {}
        if voice is not None:
            self._voices[DEFAULT_VOICE] = voice
        try:
            self._check_settings(self._settings)
        except InvalidRequest as exc:
            raise ValueError(f"MisoTTSService settings: {exc}") from exc
        self._agent_context: str | None = None  # context_id of the reply open in the memory
        self._agent_interruptible = True
        self._playout: tuple[str, PlayoutClock] | None = None  # where the open context's audio plays
        self._last_word_ts = 0.0

    # -- public --------------------------------------------------------------------------------

    @property
    def engine(self) -> MisoEngine | RemoteEngine:
        """The engine the requests go to: in process, or the :class:`RemoteEngine` of ``url``."""
        return self._engine

    @property
    def memory(self) -> ConversationMemory:
        return self._memory

    @property
    def tone_conditioning(self) -> bool:
        return self._tone_conditioning

    def register_voice(self, name: str, voice: VoicePrompt) -> None:
        """Make a voice prompt selectable by name (``Settings(voice=name)``, also at run time)."""
        if not isinstance(voice, VoicePrompt):
            raise TypeError(f"voice must be a VoicePrompt, got {type(voice).__name__}")
        self._voices[name] = voice

    def user_audio_tap(self, **kwargs: Any) -> MisoUserAudioTap:
        """A processor to put right after ``transport.input()`` when input audio doesn't reach the TTS."""
        return MisoUserAudioTap(self, **kwargs)

    def can_generate_metrics(self) -> bool:
        return True

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        if self._remote is not None:  # the WebSocket handshake now, not on the first sentence
            self._connect_task = self.create_task(self._connect(), name=f"{self}::connect")

    async def _connect(self) -> None:
        assert self._remote is not None
        try:
            await self._remote.connect()  # opens (or reuses) the WebSocket
        except Exception as exc:  # reported on the first sentence, which tries again
            logger.warning(f"{self}: {exc}")

    async def cleanup(self) -> None:
        await super().cleanup()
        if self._connect_task is not None:
            await self.cancel_task(self._connect_task)
            self._connect_task = None
        if self._remote is not None:
            await self._remote.aclose()

    # -- frames --------------------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InterruptionFrame) and self._agent_interruptible:
            # Only an interruption cuts the reply (a user who starts speaking with interruptions
            # off does not): to what was played by now, also when its generation had already ended.
            self._finish_agent_turn(interrupted=True)
        if self._tone_conditioning:
            self._capture.handle(frame, direction, self)

    async def on_audio_context_interrupted(self, context_id: str) -> None:
        if context_id == self._agent_context:
            self._finish_agent_turn(interrupted=True)
        self._forget_playout(context_id)

    async def on_audio_context_completed(self, context_id: str) -> None:
        # Its audio is all handed over; Pipecat times the words of a context that resumes afresh.
        # The reply stays open in the memory: its audio may still be playing.
        self._forget_playout(context_id)

    async def _update_settings(self, delta: TTSSettings) -> dict[str, Any]:
        candidate = self._settings.copy()
        # Pipecat types the delta as the same class, but merges the given fields of any settings object
        # (a plain TTSSettings delta, as its docs send, included).
        candidate.apply_update(delta)  # pyright: ignore[reportArgumentType]
        try:
            self._check_settings(candidate)
        except InvalidRequest as exc:
            await self.push_error(f"{self}: settings update refused, the settings are unchanged: {exc}", exception=exc)
            return {}
        changed = await super()._update_settings(delta)
        unhandled = {k for k in changed if k in ("model", "language")}
        if unhandled:
            self._warn_unhandled_updated_settings(unhandled)
        return changed

    def _check_settings(self, settings: MisoTTSSettings) -> None:
        """Raise InvalidRequest unless every request made with ``settings`` would be valid."""
        settings_request(settings, self._voices, "x")  # the request declares the bounds (SamplingParams for sampling)

    # -- synthesis -----------------------------------------------------------------------------

    @traced_tts
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Stream the sentence's audio while the engine generates it, and its words as they play.

        Args:
            text: the sentence to speak.
            context_id: the reply's audio context (shared by its sentences).
        """
        await self.start_tts_usage_metrics(text)
        stream = None
        keepalive = None
        try:
            if self._tone_conditioning:
                self._open_agent_turn(context_id)
            stream = self._engine.stream(self._request(text), client=self)  # this conversation's turn
            self._share_playout(stream, context_id)
            if self._tone_conditioning:
                self._memory.agent_add_text(text)
            keepalive = self.create_task(self._keep_context_alive(context_id), name=f"{self}::keepalive")
            async for frame in self._audio_frames(stream, context_id):
                yield frame
        except EngineClosed as exc:
            await self.push_error(f"{self}: {exc}", exception=exc, force_treat_as_permanent=True)
        except Exception as exc:
            yield self._error_frame(exc)
        finally:
            if stream is not None:
                stream.cancel()  # no-op when it ended; frees the engine slot at the next step otherwise
            if keepalive is not None:
                await self.cancel_task(keepalive)
            await self.stop_ttfb_metrics()

    async def _audio_frames(self, stream: AsyncIterator[AudioChunk], context_id: str) -> AsyncGenerator[Frame, None]:
        """The stream's audio as frames at the pipeline's rate, each chunk's words queued behind it,
        and its audio kept in the agent's turn (tone conditioning)."""
        resampler = create_stream_resampler(clear_after_secs=None) if self.sample_rate != SAMPLE_RATE else None
        first = True
        async for chunk in stream:
            if first:
                await self.stop_ttfb_metrics()
                first = False
            if self._tone_conditioning and self._agent_context == context_id:
                self._memory.push_agent_audio(chunk.pcm, chunk.words)
            played_at = self._playout_for(context_id).push(chunk.duration_s)
            audio = chunk.to_int16()
            if resampler is not None and audio:
                audio = await resampler.resample(audio, SAMPLE_RATE, self.sample_rate)
            if audio:
                yield TTSAudioRawFrame(audio, self.sample_rate, 1, context_id=context_id)
            if chunk.words:  # queued behind the audio they belong to, in the same context
                await self.add_word_timestamps(self._word_times(chunk, played_at), context_id)
        if resampler is not None:
            tail = await resampler.flush()
            if tail:
                yield TTSAudioRawFrame(tail, self.sample_rate, 1, context_id=context_id)

    def _error_frame(self, exc: Exception) -> ErrorFrame:
        """What the pipeline is told when this utterance fails; the next one is tried afresh."""
        if isinstance(exc, ConnectionError):  # url=: the server is unreachable or the connection dropped; retryable
            return ErrorFrame(
                error=f"{self}: MisoTTS server connection failed: {exc}",
                exception=exc,
                category=ErrorCategory.CONNECTIVITY,
            )
        if isinstance(exc, MisoError):  # invalid request (text, settings, audio), engine busy, missing watermark
            refused = error_code(exc) == "unauthorized"  # url=: the server refused our token
            return ErrorFrame(
                error=f"{self}: {exc}", exception=exc, category=ErrorCategory.AUTHENTICATION if refused else None
            )
        return ErrorFrame(error=f"{self}: synthesis failed: {exc}", exception=exc)  # inside the engine

    def _request(self, text: str) -> SynthesisRequest:
        return settings_request(
            self._settings, self._voices, text, speaker=self._memory.agent_speaker, context=self._context()
        )

    def _context(self) -> tuple[Segment, ...]:
        if not self._tone_conditioning:
            return ()
        return self._memory.reply_context(
            reply=None if self._agent_context is not None else (), max_turns=self._max_turns
        )

    # -- word timestamps -----------------------------------------------------------------------

    def _share_playout(self, stream: AudioStream, context_id: str) -> None:
        """Tell an in-process engine where this sentence's audio plays: after the reply's earlier
        sentences, so its listener has more in hand than real time from its first chunk says (the
        scheduler lends that slack to joiners, engine/deadline.py)."""
        if isinstance(stream, SpeechStream):
            clock = self._playout_for(context_id)
            before = clock.pushed_s  # the reply's audio handed over before this sentence's
            stream.playout = lambda: max(0.0, clock.heard_s() - before)

    def _playout_for(self, context_id: str) -> PlayoutClock:
        """Where the context's audio plays, from its first audio (Pipecat's word-timestamp baseline)."""
        if self._playout is None or self._playout[0] != context_id:
            self._playout = (context_id, PlayoutClock())
            self._last_word_ts = 0.0
        return self._playout[1]

    def _forget_playout(self, context_id: str) -> None:
        if self._playout is not None and self._playout[0] == context_id:
            self._playout = None

    def _word_times(self, chunk: AudioChunk, played_at: float) -> list[tuple[str, float]]:
        """The chunk's words as (word, seconds after the context's first audio): where they play."""
        times = []
        for w in chunk.words:
            self._last_word_ts = max(self._last_word_ts, played_at + w.start_s - chunk.start_s)
            times.append((w.word, self._last_word_ts))
        return times

    # -- the agent's turn in the memory --------------------------------------------------------

    def _open_agent_turn(self, context_id: str) -> None:
        """A reply's first sentence opens its turn (the previous reply, played out, is kept whole)."""
        if self._agent_context == context_id and self._memory.agent_speaking:
            return
        self._memory.agent_started()
        self._agent_context = context_id
        tts_context = self._tts_contexts.get(context_id)
        self._agent_interruptible = tts_context.interruptible if tts_context is not None else True

    def _finish_agent_turn(self, interrupted: bool) -> None:
        if self._agent_context is not None:
            self._agent_context = None
            self._memory.agent_finished(interrupted=interrupted)

    async def _keep_context_alive(self, context_id: str) -> None:
        # Pipecat ends an audio context that gets nothing for stop_frame_timeout_s (3 s): keep it open
        # while the engine prepares, queues or prefills the request.
        interval = max(0.05, self._stop_frame_timeout_s / 3)
        while True:
            await asyncio.sleep(interval)
            self._refresh_audio_context(context_id)

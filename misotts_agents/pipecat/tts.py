"""MisoTTSService: the shared MisoTTS engine as a Pipecat (1.14) TTS service, with tone conditioning.

How the pieces fit (see the class docstring for the user-facing summary):

- ``run_tts`` builds one :class:`SynthesisRequest` per sentence (Pipecat aggregates the LLM's text into
  sentences and calls ``run_tts`` once for each, all sentences of a reply sharing one ``context_id``),
  submits it to the shared engine and ``async for``-s its stream: chunks arrive while the engine
  generates and are pushed as ``TTSAudioRawFrame`` at once. The event loop never blocks.
- An interruption cancels the task running ``run_tts``: the ``CancelledError`` lands on the stream's
  ``await``, which cancels the engine request (its slot is freed at the scheduler's next step).
- Each chunk carries the words it covers (engine/words.py, estimated timings); they go to Pipecat as
  word timestamps (``add_word_timestamps``, like its word-timestamp services), placed where the
  chunk's audio plays, so the assistant context holds exactly the words heard when the user barges in.
- The turn memory (:class:`ConversationMemory`) is fed the user's turn audio and transcript and the
  agent's generated audio with the same word timings; each request's ``context`` is read from it.
- With ``url=`` the engine is a :class:`~misotts_agents.server.RemoteEngine` (same ``stream()``
  surface, over the ``misotts-agents serve`` WebSocket): the memory stays in this process and each
  request carries its context; a cancel is sent to the server, which frees the slot.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from loguru import logger
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    LLMContextUserTurnFrame,
    StartFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.utils.errors import ErrorCategory
from pipecat.utils.tracing.service_decorators import traced_tts
from pipecat.utils.types import NOT_GIVEN, NotGiven

from misotts_agents.audio import SAMPLE_RATE
from misotts_agents.connect import server_connection
from misotts_agents.engine.facade import MisoEngine
from misotts_agents.engine.memory import ConversationMemory
from misotts_agents.engine.playout import PlayoutClock
from misotts_agents.engine.registry import shared_engine
from misotts_agents.engine.request import AudioChunk, Segment, SynthesisRequest
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.errors import EngineClosed, InvalidRequest, MisoError
from misotts_agents.model.config import WeightFormat
from misotts_agents.model.sources import DEFAULT_MODEL

if TYPE_CHECKING:
    from misotts_agents.server.client import RemoteEngine

DEFAULT_VOICE = "default"
_REQUEST_DEFAULTS = SynthesisRequest("defaults")  # the settings start from the request's own defaults
_T = TypeVar("_T")


def _given(value: _T | NotGiven, name: str) -> _T:
    """A setting's value. The service's settings are complete (every field given: Pipecat checks at
    start, and an update only replaces given fields), so NOT_GIVEN here is refused, never sent on."""
    if isinstance(value, NotGiven):
        raise InvalidRequest(f"the {name} setting has no value")
    return value


@dataclass
class MisoTTSSettings(TTSSettings):
    """Runtime-updatable settings of :class:`MisoTTSService` (send a delta in ``TTSUpdateSettingsFrame``).

    Every change applies from the next request (the next sentence) on. An update is checked when it
    arrives: a value out of bounds (or an unregistered voice) is refused with an ``ErrorFrame`` and
    the settings stay as they were; the constructor raises ``ValueError`` for the same values.

    Parameters:
        voice: name of a registered voice prompt (``MisoTTSService.register_voice``; the constructor's
            ``voice=`` is registered as ``"default"``), or None for no voice prompt.
        temperature: sampling temperature, in (0, 100].
        topk: top-k sampling, in [1, 2051] (1 is greedy).
        watermark: None uses the engine's setting; False opts requests out of the SilentCipher mark;
            True requires it (an error if the engine was loaded without a watermarker).
        max_audio_ms: longest audio per sentence.
        max_ahead_s: pace generation to at most this many seconds of audio ahead of real time
            (less GPU work wasted when the user barges in); None generates flat out.
        seed: fixed sampling seed in [0, 2**63 - 1] (reproducible audio), or None for a fresh one per
            request.
    """

    temperature: float | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    topk: int | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    watermark: bool | NotGiven | None = field(default_factory=lambda: NOT_GIVEN)
    max_audio_ms: float | NotGiven = field(default_factory=lambda: NOT_GIVEN)
    max_ahead_s: float | NotGiven | None = field(default_factory=lambda: NOT_GIVEN)
    seed: int | NotGiven | None = field(default_factory=lambda: NOT_GIVEN)


class _UserTurnCapture:
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


class MisoTTSService(TTSService):
    """MisoTTS (or Sesame CSM-1B) as a streaming Pipecat TTS service, in process or on a server.

    One engine serves every pipeline in the process: by default the service asks
    :func:`misotts_agents.engine.registry.shared_engine` for ``model`` (loaded once, on first use; load it
    before building pipelines, Pipecat's setup timeout is 20 s), or pass ``engine=``. Each service
    (one per pipeline) has its own :class:`ConversationMemory`.

    **Remote mode** (``url="ws://host:8700"``): the service loads nothing and runs its requests on a
    ``misotts-agents serve`` server through its own :class:`~misotts_agents.server.RemoteEngine` (one
    WebSocket, opened when the pipeline starts, closed in ``cleanup()``); ``token`` (default: the
    ``MISOTTS_TOKEN`` environment variable) is the server's bearer token. Everything below works the
    same: the turn memory stays here and each request carries its context and voice prompt, an
    interruption sends a cancel (the server frees the slot at its next frame step). ``device`` and
    ``watermark`` are then the server's business (``Settings(watermark=False)`` still opts a request
    out where the server allows it). A failed or dropped connection is a non-permanent
    ``ErrorFrame`` (category ``CONNECTIVITY``); the next sentence reconnects.

    Audio streams while the engine generates (first chunk after one 80 ms frame), as 16-bit mono
    ``TTSAudioRawFrame`` at the pipeline's output rate (``PipelineParams(audio_out_sample_rate=...)``,
    or ``sample_rate=``); the 24 kHz model audio is resampled with one streaming soxr resampler per
    utterance. An ``InterruptionFrame`` cancels the engine request at its next frame step.

    **Tone conditioning** (``tone_conditioning=True``): each request's prompt holds the last
    ``max_turns`` turns of the conversation, oldest first: the user's turns (their audio and
    transcript) and the agent's own earlier replies (only what was played when the user barged in),
    plus the reply being spoken (later sentences hear the earlier ones), after the optional voice
    prompt. How the user's side gets here, in Pipecat 1.14:

    - *Audio*: ``InputAudioRawFrame`` flows down the whole pipeline by default: the input transport
      passes it on (``TransportParams.audio_in_passthrough=True``), so do the STT services
      (``audio_passthrough=True``), the user aggregator (its catch-all branch) and the LLM services
      (their catch-all ``push_frame``). The service records it between ``UserStartedSpeakingFrame`` and
      ``UserStoppedSpeakingFrame`` (broadcast by the user aggregator, so they reach the TTS
      downstream), with a pre-roll for VAD lag; any input rate. Where a processor in between drops
      input audio, put ``tts.user_audio_tap()`` right after ``transport.input()``.
    - *Transcript*: ``TranscriptionFrame`` is consumed by the user aggregator; the aggregator then
      broadcasts ``LLMContextUserTurnFrame`` (the turn's text as written to the LLM context) before it
      runs the LLM, so it reaches the TTS ahead of the reply. A ``TranscriptionFrame`` that does reach
      the service (no aggregator in front) is used instead.

    **Word timestamps**: each chunk's words (estimated by the engine: its audio spread over the
    words by their length, refined when the sentence ends; see ``misotts_agents.engine.words``) are
    pushed with ``add_word_timestamps`` where that audio plays (a queue of generated audio delays it,
    a stall while generation catches up delays the rest), so the assistant context gets each word as
    it is heard: an interrupted reply leaves exactly the words heard, not whole sentences. Text
    aggregation must be by sentence (the default): the model speaks whole texts, and
    ``text_aggregation_mode=TOKEN`` is refused at construction.

    The agent's side is recorded from the generated audio with the same word timings. A reply stays
    one turn until the next reply starts, kept whole; only an interruption cuts it, to the audio
    played by then (audio handed over less audio still queued) and the words that started in it. A
    user turn that ends while the reply is still open (interruptions off) is remembered after it.
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
        default_settings = self.Settings(
            model=label,
            voice=DEFAULT_VOICE if voice is not None else None,
            language=None,
            temperature=_REQUEST_DEFAULTS.temperature,
            topk=_REQUEST_DEFAULTS.topk,
            watermark=None,
            max_audio_ms=_REQUEST_DEFAULTS.max_audio_ms,
            max_ahead_s=None,
            seed=None,
        )
        if settings is not None:
            default_settings.apply_update(settings)
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            push_text_frames=False,  # words are pushed as they are heard (add_word_timestamps)
            sample_rate=sample_rate,
            settings=default_settings,
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
        self._capture = _UserTurnCapture(memory)
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
        self._request_with(settings, "x")  # the request declares the bounds (SamplingParams for sampling)

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
            stream = self._engine.stream(self._request(text))
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
            refused = getattr(exc, "code", None) == "unauthorized"  # url=: the server refused our token
            return ErrorFrame(
                error=f"{self}: {exc}", exception=exc, category=ErrorCategory.AUTHENTICATION if refused else None
            )
        return ErrorFrame(error=f"{self}: synthesis failed: {exc}", exception=exc)  # inside the engine

    def _request(self, text: str) -> SynthesisRequest:
        return self._request_with(self._settings, text, speaker=self._memory.agent_speaker, context=self._context())

    def _request_with(
        self, s: MisoTTSSettings, text: str, speaker: int = 0, context: tuple[Segment, ...] = ()
    ) -> SynthesisRequest:
        voice = None
        name = _given(s.voice, "voice")
        if name is not None:
            voice = self._voices.get(name)
            if voice is None:
                raise _UnknownVoice(f"unknown voice {name!r}: register it with register_voice() first")
        return SynthesisRequest(
            text,
            speaker=speaker,
            context=context,
            voice=voice,
            temperature=_given(s.temperature, "temperature"),
            topk=_given(s.topk, "topk"),
            seed=_given(s.seed, "seed"),
            max_audio_ms=_given(s.max_audio_ms, "max_audio_ms"),
            watermark=_given(s.watermark, "watermark"),
            max_ahead_s=_given(s.max_ahead_s, "max_ahead_s"),
        )

    def _context(self) -> tuple[Segment, ...]:
        if not self._tone_conditioning or not self._max_turns:
            return ()
        context = self._memory.context()
        current = self._memory.current_agent_segment() if self._agent_context is not None else None
        if current is not None:  # the reply so far: later sentences hear the earlier ones
            context += (current,)
        return context[-self._max_turns :]

    # -- word timestamps -----------------------------------------------------------------------

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


class _UnknownVoice(InvalidRequest):
    pass

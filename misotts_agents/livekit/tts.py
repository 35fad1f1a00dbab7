"""MisoTTS as a LiveKit Agents TTS: streaming, one engine per process, errors mapped to APIError.

One ``stream()`` carries one speech segment (LiveKit 1.8 creates one per segment). Text is cut into
sentences as it arrives from the LLM; each sentence is one engine request, started as soon as the
sentence is complete, and its audio is pushed to the emitter chunk by chunk while it is generated.
Earlier sentences of the same segment go into the prompt as the agent's own context (voice
continuity inside a reply), after the conversation's tone context (see :mod:`.tone`).

Each chunk's words (engine/words.py: estimated timings) are pushed as ``TimedString``s (the TTS
declares ``aligned_transcript``), so with ``AgentSession(use_tts_aligned_transcript=True)`` LiveKit's
transcript follows the audio word by word, and an interrupted reply's chat message ends on the
last word heard. A sentence longer than half of ``max_audio_ms`` (at a typical speaking rate) is
split at clause boundaries first, so the per-request cap does not cut it; if the cap still cuts
one, a warning says so.

Cancelling the stream's task (an interruption) cancels the engine request: the scheduler drops it
at its next frame step and frees its slot. Every attempt (LiveKit retries retryable errors) starts
afresh; a stream is forgotten by the TTS as soon as it ends, however it ends, and ``TTS.aclose()``
ends every stream still running, one-shot ``synthesize`` ones too. ``conn_options.timeout`` counts
from when a request leaves the engine's queue (a busy engine is not a failed one).

With ``url=`` the engine is a :class:`~misotts_agents.server.RemoteEngine` on a ``misotts-agents
serve`` server: the same requests (the tone context travels in each one), a cancel message instead
of a local cancel, and the server's errors raised as the engine's exception classes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    APIConnectionError,
    APIConnectOptions,
    APIError,
    APIStatusError,
    APITimeoutError,
    tokenize,
    tts,
    utils,
)
from livekit.agents.types import NOT_GIVEN, NotGivenOr, TimedString

from misotts_agents.audio import SAMPLE_RATE
from misotts_agents.connect import server_connection
from misotts_agents.engine.audio_stream import AudioSource, AudioStream, first_chunk
from misotts_agents.engine.memory import ConversationMemory
from misotts_agents.engine.request import AudioChunk, Segment, SynthesisRequest
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.engine.words import split_for_length, words_of
from misotts_agents.errors import (
    WIRE_CODES,
    CheckpointError,
    EngineClosed,
    InvalidRequest,
    ModelSourceError,
    error_code,
)
from misotts_agents.livekit.tone import SpokenSegment, ToneTracker, current_tracker
from misotts_agents.model.sources import DEFAULT_MODEL

log = logging.getLogger("misotts_agents.livekit")

MIME_TYPE = "audio/pcm"
NUM_CHANNELS = 1
# Earlier sentences of the segment kept as the agent's context for the next sentence.
SEGMENT_CONTEXT_SENTENCES = 2
# A sentence is split (at clauses) when it would take more than this share of max_audio_ms at a
# typical speaking rate: real speech varies, and the cap must not be what ends it.
SPLIT_SHARE = 0.5


@dataclass
class _Options:
    model: str
    speaker: int
    temperature: float
    topk: int
    max_audio_ms: float
    voice: VoicePrompt | None
    tone_conditioning: bool
    max_ahead_s: float | None

    def check(self) -> _Options:
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


def map_error(exc: BaseException) -> APIError:
    """An engine exception as the LiveKit error the framework's retry logic understands: whether a
    retry may succeed is the error table's (``errors.WIRE_CODES``), the kind of error what failed."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, TimeoutError):
        return APITimeoutError(f"MisoTTS produced no audio in time: {exc}")
    code = error_code(exc)
    row = WIRE_CODES[code]
    if isinstance(exc, (ModelSourceError, CheckpointError)):  # the model could not be loaded
        return APIConnectionError(f"MisoTTS engine failed to load: {exc}", retryable=row.retryable)
    if isinstance(exc, ConnectionError):  # url= (or the inference process): unreachable, or connection lost
        return APIConnectionError(f"MisoTTS server connection failed: {exc}", retryable=row.retryable)
    if isinstance(exc, EngineClosed) or code == "internal":
        return APIConnectionError(f"MisoTTS engine error: {type(exc).__name__}: {exc}", retryable=row.retryable)
    return APIStatusError(
        f"MisoTTS refused the request ({code}): {exc}", status_code=row.http_status, retryable=row.retryable
    )


class TTS(tts.TTS):
    """MisoTTS (or Sesame CSM) as a streaming LiveKit TTS (24 kHz mono PCM), in process or on a server.

    ``engine``: a :class:`~misotts_agents.MisoEngine`, an :class:`.InferenceEngine` (the worker's
    shared inference process), or None for the process-wide engine of ``model``
    (:func:`misotts_agents.engine.registry.shared_engine`, loaded on ``prewarm()`` or first use, in a
    thread). ``device`` and ``watermark`` are passed to the load. ``voice`` fixes the voice;
    ``memory`` is an explicit turn memory for every stream of this TTS (one TTS per conversation);
    otherwise the session's memory from :class:`.MisoToneMixin` is used when
    ``tone_conditioning`` is on. ``max_audio_ms`` caps each request (longer sentences are split at
    clause boundaries first). Every option is checked here and in ``update_options`` (``ValueError``).

    Word timings: the TTS pushes each word with its estimated start and end (``TimedString``); turn
    on ``AgentSession(use_tts_aligned_transcript=True)`` for a transcript that follows the audio.

    Preemptive generation: with ``preemptive_generation={"preemptive_tts": True}`` a reply is
    synthesized before the user's turn is confirmed; it is conditioned on the user's audio so far
    and the preflight (or final) transcript so far, as the STT has them.

    ``url``: run on a ``misotts-agents serve`` server instead (``ws://host:8700``; not with
    ``engine``). The TTS then loads nothing: it makes its own
    :class:`~misotts_agents.server.RemoteEngine` (one WebSocket, opened by ``prewarm()`` or the
    first sentence, closed by ``aclose()``; make the TTS inside the job, as each connection belongs
    to one event loop), with ``token`` or else ``$MISOTTS_TOKEN`` as the bearer token. Tone
    conditioning, voices, cancellation and error mapping work as in process; an unreachable server
    or a dropped connection is a retryable :class:`APIConnectionError`. ``device``, ``watermark``
    and ``load_options`` are then the server's business.
    """

    def __init__(
        self,
        model: str | Path = DEFAULT_MODEL,
        *,
        engine: AudioSource | None = None,
        url: str | None = None,
        token: str | None = None,
        device: str | None = None,
        watermark: bool = True,
        voice: VoicePrompt | None = None,
        temperature: float = 0.9,
        topk: int = 50,
        max_audio_ms: float = 30_000,
        memory: ConversationMemory | None = None,
        tone_conditioning: bool = True,
        speaker: int = 0,
        max_ahead_s: float | None = None,
        sentence_tokenizer: tokenize.SentenceTokenizer | None = None,
        load_options: dict[str, Any] | None = None,
    ) -> None:
        # Every option is checked now, not on the first reply.
        self._opts = _Options(
            model=str(model),
            speaker=speaker,
            temperature=temperature,
            topk=topk,
            max_audio_ms=max_audio_ms,
            voice=voice,
            tone_conditioning=tone_conditioning,
            max_ahead_s=max_ahead_s,
        ).check()
        if memory is not None and not isinstance(memory, ConversationMemory):
            raise InvalidRequest(f"memory must be a ConversationMemory, got {type(memory).__name__}")
        if sentence_tokenizer is not None and not isinstance(sentence_tokenizer, tokenize.SentenceTokenizer):
            raise InvalidRequest(f"sentence_tokenizer must be a SentenceTokenizer, got {type(sentence_tokenizer)}")
        remote = server_connection(engine, url, token)  # url=: this TTS's own connection
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=True, aligned_transcript=True),
            sample_rate=SAMPLE_RATE,
            num_channels=NUM_CHANNELS,
        )
        self._memory = memory
        self._remote = remote  # closed in aclose
        self._connecting: asyncio.Task[Any] | None = None
        self._engine = remote if remote is not None else engine
        self._load_kwargs: dict[str, Any] = {"watermark": watermark, **(load_options or {})}
        if device is not None:
            self._load_kwargs["device"] = device
        self._loading: concurrent.futures.Future[AudioSource] | None = None
        self._load_lock = threading.Lock()
        self._sentences = sentence_tokenizer or tokenize.basic.SentenceTokenizer(min_sentence_len=10)
        self._streams: set[tts.SynthesizeStream | tts.ChunkedStream] = set()  # running: ended by aclose()

    @property
    def model(self) -> str:
        return self._opts.model

    @property
    def provider(self) -> str:
        return "misotts"

    @property
    def memory(self) -> ConversationMemory | None:
        return self._memory

    @property
    def voice(self) -> VoicePrompt | None:
        return self._opts.voice

    def update_options(
        self,
        *,
        voice: NotGivenOr[VoicePrompt | None] = NOT_GIVEN,
        temperature: NotGivenOr[float] = NOT_GIVEN,
        topk: NotGivenOr[int] = NOT_GIVEN,
        max_audio_ms: NotGivenOr[float] = NOT_GIVEN,
        max_ahead_s: NotGivenOr[float | None] = NOT_GIVEN,
        speaker: NotGivenOr[int] = NOT_GIVEN,
    ) -> None:
        """Change options for the next sentences; options not given keep their value.

        ``voice=None`` goes back to the default voice (the tone memory's voice prompt if it has one,
        else the speaker's own voice); ``max_ahead_s=None`` turns pacing off. A bad value raises
        ``ValueError`` and changes nothing.
        """
        given = {
            "voice": voice,
            "temperature": temperature,
            "topk": topk,
            "max_audio_ms": max_audio_ms,
            "max_ahead_s": max_ahead_s,
            "speaker": speaker,
        }
        self._opts = replace(self._opts, **{k: v for k, v in given.items() if utils.is_given(v)}).check()

    # -- the engine ---------------------------------------------------------------------------

    def _start_loading(self, warm: bool) -> concurrent.futures.Future[AudioSource]:
        with self._load_lock:
            if self._loading is None:
                self._loading = concurrent.futures.Future()
                threading.Thread(target=self._load, args=(warm,), name="misotts-load", daemon=True).start()
            return self._loading

    def _load(self, warm: bool) -> None:
        from misotts_agents.engine.registry import shared_engine

        assert self._loading is not None
        try:
            engine = shared_engine(self._opts.model, **self._load_kwargs)
            if warm:  # one frame through every part (model, Mimi, watermark) so lazy set-up is done
                engine.synthesize(SynthesisRequest("Hello.", max_audio_ms=80, seed=0))
        except BaseException as exc:
            log.exception("loading the MisoTTS engine failed")
            with self._load_lock:
                self._loading.set_exception(exc)
                self._loading = None  # a later call tries again
            return
        self._loading.set_result(engine)

    def prewarm(self) -> None:
        """Start loading (and warming) the shared engine in the background; returns at once.

        With ``url``: nothing is loaded; the server connection is opened in the running event loop
        (if any), so the first sentence does not wait for the handshake."""
        if self._remote is not None:
            self._open_connection()
        elif self._engine is None:
            self._start_loading(warm=True)

    def _open_connection(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop here (a worker's setup): the first sentence connects
            return
        if self._connecting is None or self._connecting.done():
            self._connecting = loop.create_task(self._connect(), name="misotts-connect")

    async def _connect(self) -> None:
        assert self._remote is not None
        try:
            await self._remote.connect()  # opens (or reuses) the WebSocket
        except Exception as exc:  # the first sentence tries again and reports it
            log.warning("MisoTTS server: %s", exc)

    def load_engine(self) -> AudioSource:
        """Load the engine now, blocking (for a worker's ``setup_fnc`` / process prewarm); with
        ``url`` there is nothing to load and the :class:`RemoteEngine` is returned at once."""
        if self._engine is None:
            self._engine = self._start_loading(warm=True).result()
        return self._engine

    async def _get_engine(self) -> AudioSource:
        if self._engine is None:
            future = self._start_loading(warm=False)
            try:
                self._engine = await asyncio.wrap_future(future)
            except Exception as exc:
                raise map_error(exc) from exc
        return self._engine

    # -- requests -----------------------------------------------------------------------------

    def _memory_for_stream(self) -> tuple[ConversationMemory | None, ToneTracker | None]:
        tracker = current_tracker()
        if self._memory is not None:
            return self._memory, tracker
        if tracker is not None and self._opts.tone_conditioning:
            return tracker.memory, tracker
        return None, tracker

    def _request(self, text: str, memory: ConversationMemory | None, earlier: list[Segment]) -> SynthesisRequest:
        opts = self._opts
        reply = earlier[-SEGMENT_CONTEXT_SENTENCES:]
        if memory is None or not opts.tone_conditioning:
            return opts.request(text, opts.voice, tuple(reply))
        return opts.request(text, opts.voice or memory.voice, memory.reply_context(reply=reply))

    def synthesize(self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> ChunkedStream:
        return self._track(ChunkedStream(tts=self, input_text=text, conn_options=conn_options))

    def stream(self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> SynthesizeStream:
        return self._track(SynthesizeStream(tts=self, conn_options=conn_options))

    def _track(self, stream: Any) -> Any:
        """Keep a running stream for aclose(), and forget it the moment its task ends, however."""
        self._streams.add(stream)
        task = stream._task if isinstance(stream, tts.SynthesizeStream) else stream._synthesize_task
        task.add_done_callback(lambda _task: self._streams.discard(stream))
        return stream

    @property
    def running_streams(self) -> int:
        """Streams (one-shot or streaming) still running."""
        return len(self._streams)

    async def aclose(self) -> None:
        for stream in list(self._streams):
            await stream.aclose()
        self._streams.clear()
        await super().aclose()
        if self._connecting is not None:
            await utils.aio.cancel_and_wait(self._connecting)
            self._connecting = None
        if self._remote is not None:
            await self._remote.aclose()


class _Speaker:
    """Speaks sentences one after another into one emitter: one stream attempt's state, made afresh
    for every attempt (a retry is conditioned on nothing the failed attempt produced)."""

    def __init__(self, owner: TTS, conn_options: APIConnectOptions) -> None:
        self._tts = owner
        self._timeout = conn_options.timeout
        self._memory, self._tracker = owner._memory_for_stream()
        self._segment: SpokenSegment | None = self._tracker.begin_segment() if self._tracker is not None else None
        self._earlier: list[Segment] = []
        self._pushed_s = 0.0  # audio pushed so far: where the next request's words start
        self._words = 0  # words pushed so far (the first goes without a leading space)

    def abandon(self) -> None:
        """The attempt failed. Without audio it never plays: the tracker forgets it (the retry's
        segment takes its place); audio it did push plays, so its record stays."""
        if self._segment is not None and self._tracker is not None and not self._segment.seconds:
            self._tracker.discard(self._segment)

    async def speak(self, text: str, emitter: tts.AudioEmitter) -> None:
        text = text.strip()
        if not text:
            return
        engine = await self._tts._get_engine()
        max_s = self._tts._opts.max_audio_ms / 1000 * SPLIT_SHARE
        for part in split_for_length(text, max_s):
            await self._request(engine, part, emitter)

    async def _request(self, engine: AudioSource, text: str, emitter: tts.AudioEmitter) -> None:
        if self._earlier:  # release the last sentence's held-back tail while this one is prefilled
            emitter.flush()
        try:
            request = self._tts._request(text, self._memory, self._earlier)
            stream = engine.stream(request)
        except Exception as exc:
            raise map_error(exc) from exc
        if self._segment is not None:
            self._segment.sentence(text)
        pieces: list[np.ndarray] = []
        spoken: list[str] = []
        last: AudioChunk | None = None
        try:
            async for chunk in _chunks(stream, self._timeout):
                if chunk.pcm.size:
                    emitter.push(chunk.to_int16())
                    pieces.append(chunk.pcm)
                for w in chunk.words:
                    start, end = self._pushed_s + w.start_s, self._pushed_s + w.end_s
                    emitter.push_timed_transcript(
                        TimedString(w.word if not self._words else f" {w.word}", start_time=start, end_time=end)
                    )
                    self._words += 1
                    spoken.append(w.word)
                if self._segment is not None:
                    self._segment.audio(chunk.pcm, chunk.words)
                last = chunk
        finally:
            stream.cancel()  # no-op when it ended by itself; frees the slot on cancel/errors
        if last is not None and last.final and last.start_frame + last.frames >= request.max_frames:
            rest = " ".join(words_of(text)[len(spoken) :])
            log.warning(
                "MisoTTS: max_audio_ms=%s cut a sentence short even after splitting it: %s",
                self._tts._opts.max_audio_ms,
                f"not spoken: {rest!r}" if rest else f"the end of {text!r} may be clipped",
            )
        if pieces:
            audio = np.concatenate(pieces)
            self._pushed_s += audio.size / SAMPLE_RATE
            heard = " ".join(spoken) if spoken else text  # the words its audio holds
            self._earlier.append(Segment(self._tts._opts.speaker, heard, audio, SAMPLE_RATE))


async def _chunks(stream: AudioStream, timeout: float) -> AsyncIterator[AudioChunk]:
    """The stream's chunks; ``timeout`` bounds the wait for each, counted for the first one from when
    the request leaves the engine's queue (a busy engine delays it; it has not failed)."""
    iterator = stream.__aiter__()
    first = True
    while True:
        try:
            if first:
                chunk = await first_chunk(stream, iterator, timeout)
                first = False
            else:
                chunk = await asyncio.wait_for(iterator.__anext__(), timeout)
        except StopAsyncIteration:
            return
        except TimeoutError as exc:
            raise APITimeoutError(f"MisoTTS produced no audio for {timeout} s") from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc) from exc
        yield chunk


def _initialize(output_emitter: tts.AudioEmitter, *, stream: bool) -> None:
    """Declare what follows: one request id, 24 kHz mono raw PCM."""
    output_emitter.initialize(
        request_id=utils.shortuuid(),
        sample_rate=SAMPLE_RATE,
        num_channels=NUM_CHANNELS,
        mime_type=MIME_TYPE,
        stream=stream,
    )


@contextlib.contextmanager
def _attempt(owner: TTS, conn_options: APIConnectOptions) -> Iterator[_Speaker]:
    speaker = _Speaker(owner, conn_options)
    try:
        yield speaker
    except Exception:  # (a cancel, an interruption, keeps the record: what played is reported)
        speaker.abandon()
        raise


class ChunkedStream(tts.ChunkedStream):
    """One-shot text (``session.say`` / ``tts.synthesize``), streamed sentence by sentence."""

    def __init__(self, *, tts: TTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._miso = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        _initialize(output_emitter, stream=False)
        with _attempt(self._miso, self._conn_options) as speaker:
            for sentence in self._miso._sentences.tokenize(self.input_text) or [self.input_text]:
                await speaker.speak(sentence, output_emitter)


class SynthesizeStream(tts.SynthesizeStream):
    """One speech segment: text pushed by the LLM, audio out while it is generated."""

    def __init__(self, *, tts: TTS, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, conn_options=conn_options)
        self._miso = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        _initialize(output_emitter, stream=True)
        sentences = self._miso._sentences.stream()

        async def feed() -> None:
            async for item in self._input_ch:
                if isinstance(item, self._FlushSentinel):
                    sentences.flush()
                else:
                    sentences.push_text(item)
            sentences.end_input()

        feeder = asyncio.create_task(feed(), name="misotts-feed-text")
        started = False
        try:
            with _attempt(self._miso, self._conn_options) as speaker:
                async for token in sentences:
                    if not token.token.strip():
                        continue
                    if not started:
                        output_emitter.start_segment(segment_id=utils.shortuuid())
                        started = True
                    self._mark_started()
                    await speaker.speak(token.token, output_emitter)
                await feeder
            if started:
                output_emitter.end_segment()
        finally:
            await utils.aio.cancel_and_wait(feeder)
            await sentences.aclose()

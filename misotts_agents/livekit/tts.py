"""MisoTTS as a LiveKit Agents TTS: streaming, one engine per process, errors mapped to APIError.

One ``stream()`` carries one speech segment; each sentence of it is one engine request (speaker.py),
conditioned on the conversation's tone (tone.py) and the segment's earlier sentences. How it fits
LiveKit (sentences, word timings, retries, timeouts, remote mode): docs/livekit.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from livekit.agents import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions, tokenize, tts, utils
from livekit.agents.types import NOT_GIVEN, NotGivenOr

from misotts_agents.audio import SAMPLE_RATE
from misotts_agents.connect import server_connection
from misotts_agents.engine.audio_stream import AudioSource
from misotts_agents.engine.memory import ConversationMemory
from misotts_agents.engine.request import SynthesisRequest
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.errors import InvalidRequest
from misotts_agents.livekit.errors import map_error
from misotts_agents.livekit.options import TTSOptions
from misotts_agents.livekit.speaker import attempt
from misotts_agents.model.sources import DEFAULT_MODEL

log = logging.getLogger("misotts_agents.livekit")

MIME_TYPE = "audio/pcm"
NUM_CHANNELS = 1


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
        self._opts = TTSOptions(
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

    # -- streams ------------------------------------------------------------------------------

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


def _initialize(output_emitter: tts.AudioEmitter, *, stream: bool) -> None:
    """Declare what follows: one request id, 24 kHz mono raw PCM."""
    output_emitter.initialize(
        request_id=utils.shortuuid(),
        sample_rate=SAMPLE_RATE,
        num_channels=NUM_CHANNELS,
        mime_type=MIME_TYPE,
        stream=stream,
    )


class ChunkedStream(tts.ChunkedStream):
    """One-shot text (``session.say`` / ``tts.synthesize``), streamed sentence by sentence."""

    def __init__(self, *, tts: TTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._miso = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        _initialize(output_emitter, stream=False)
        with attempt(self._miso, self._conn_options) as speaker:
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
            with attempt(self._miso, self._conn_options) as speaker:
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

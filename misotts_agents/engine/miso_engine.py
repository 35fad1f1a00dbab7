"""MisoEngine: one shared engine for every conversation in the process (or on the GPU).

It loads the model, codec, tokenizer and watermarker once. ``stream(request)`` can be called from
any thread or event loop: a preparation thread tokenises the text and Mimi-encodes context audio
(Mimi holds no streaming state of its own: the scheduler's decoder owns its rows' state), then the
scheduler thread (scheduler.py) batches the request with every other active one, one frame per step.
With a watermarker, a marker thread (marking.py) watermarks each step's chunks together on their way
to the callers.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import torch

from misotts_agents.engine.job import Job
from misotts_agents.engine.marking import StepMarker
from misotts_agents.engine.prefill import PrefillChunk, parse_prefill_chunk
from misotts_agents.engine.preparation import FairPreparation
from misotts_agents.engine.prompt import PromptBuilder
from misotts_agents.engine.request import Synthesis, SynthesisRequest, join_stream
from misotts_agents.engine.scheduler import DEFAULT_MAX_WAIT_S, Scheduler
from misotts_agents.engine.stats import EngineStats
from misotts_agents.engine.step import bucket_sizes
from misotts_agents.engine.stream import SpeechStream
from misotts_agents.engine.voice import CachedVoice, VoiceCache
from misotts_agents.errors import EngineBusy, EngineClosed, ModelSourceError
from misotts_agents.model import codec
from misotts_agents.model.config import CSM_1B, MISOTTS_8B, ModelConfig, WeightFormat, parse_weights
from misotts_agents.model.mimi_stream import MimiStreamDecoder
from misotts_agents.model.quantized import check_supported
from misotts_agents.model.sources import DEFAULT_MODEL, DEFAULT_TOKENIZER, fetch_file
from misotts_agents.model.tokenizer import TextTokenizer
from misotts_agents.model.transformer import MisoModel
from misotts_agents.model.watermark import (
    DEFAULT_WATERMARK_KEY,
    DEFAULT_WATERMARK_SOURCE,
    MODEL_DIR_SUBDIR,
    Watermarker,
)
from misotts_agents.model.watermark_stream import StreamWatermarker
from misotts_agents.model.weights import load_model, read_config

log = logging.getLogger(__name__)

# Repos whose config.json may be absent: the reference hard-codes their configuration.
KNOWN_CONFIGS = {DEFAULT_MODEL: MISOTTS_8B, "sesame/csm-1b": CSM_1B}
MAKE_TINY_HINT = "For an offline test model run `misotts-agents make-tiny DIR` and pass --model DIR."


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MisoEngine:
    """The shared, framework-free engine. Thread-safe; use one per process (or per GPU).

    ``max_batch`` is how many requests generate at once (KV-cache rows; about 268 MB each in bf16
    for the 8B model); ``max_queue`` how many more may wait; beyond that ``stream`` raises
    :class:`EngineBusy` at once rather than letting callers hang. ``cuda_graphs`` (default: on
    CUDA) captures every shape of the frame step at start-up; ``compile`` (default: on CUDA)
    compiles its layers with ``torch.compile`` first.
    Every step runs ``max_batch`` rows (padded), so a request's audio does not depend on what
    shares its batch; ``batch_buckets=True`` trades that for smaller steps at low load (step.py).
    ``prefill_chunk`` bounds how much of joiners' prompts is prefilled between two frame steps while
    others speak (prefill.py): "auto" (sized from measured step and prefill times so an iteration
    stays within max(two steps, 64 ms)), a number of positions per pass, or 0 for whole prompts.
    ``overlap`` (default: on CUDA) queues each frame step before reading the one before, so the
    host's delivery work and the next prefill run while the device computes (scheduler.py).
    ``fair`` admits waiting requests to slots in turn across tenants and clients (``stream``'s
    keys; admission.py), else first come, first served; a request that waits more than
    ``max_wait_s`` for a slot (default 10 s; None: no bound) ends with :class:`EngineBusy`.
    """

    model_name = "misotts"  # what the integrations' metrics call it: the checkpoint ``load`` read

    def __init__(
        self,
        model: MisoModel,
        tokenizer: TextTokenizer,
        mimi: codec.MimiModel,
        watermarker: Watermarker | None,
        max_batch: int = 8,
        max_queue: int = 64,
        max_voices: int = 16,
        cuda_graphs: bool | None = None,
        compile: bool | None = None,
        batch_buckets: bool = False,
        prefill_chunk: PrefillChunk = "auto",
        overlap: bool | None = None,
        fair: bool = True,
        max_wait_s: float | None = DEFAULT_MAX_WAIT_S,
    ) -> None:
        prefill_chunk = parse_prefill_chunk(prefill_chunk)
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.mimi = mimi
        self.watermarker = watermarker
        self.device = model.device
        self.num_codebooks = model.num_codebooks
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.voices = VoiceCache(max_voices)
        self._prep_streams = threading.local()  # on CUDA, each preparation thread's stream (_encode_audio)
        self.prompts = PromptBuilder(tokenizer, self._encode_audio, self.num_codebooks)
        model.setup_caches(max_batch)  # slot i is cache row i
        # The decode shapes captured are the frame step's batch sizes (step.py).
        decoder = MimiStreamDecoder(
            mimi,
            batch_size=max_batch,
            graph_sizes=bucket_sizes(max_batch) if batch_buckets else None,
            cuda_graphs=self.device.type == "cuda" and cuda_graphs is not False,
        )
        self._prep: FairPreparation[Job] = FairPreparation(self._prepare)  # clients in turn (preparation.py)
        self._unprepared: set[Job] = set()  # submitted, not yet handed to the scheduler
        self._lock = threading.Lock()
        self._closed = False
        # Watermarked requests' chunks are marked once per step, all rows together, off the scheduler.
        self._marker = StepMarker(watermarker, self.device) if watermarker is not None else None
        try:
            self._scheduler = Scheduler(
                model,
                decoder,
                self.voices,
                max_batch,
                cuda_graphs=cuda_graphs,
                compile=compile,
                batch_buckets=batch_buckets,
                prefill_chunk=prefill_chunk,
                overlap=overlap,
                marker=self._marker,
                fair=fair,
                max_wait_s=max_wait_s,
            )
        except BaseException:
            if self._marker is not None:  # no engine: its marker thread goes too
                self._marker.close()
            raise

    @classmethod
    def load(
        cls,
        model: str | Path = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        tokenizer: str | Path | None = None,
        mimi: str | Path | None = None,
        watermark: bool | str | Path = True,
        watermark_key: tuple[int, ...] = DEFAULT_WATERMARK_KEY,
        max_batch: int = 8,
        max_queue: int = 64,
        cuda_graphs: bool | None = None,
        compile: bool | None = None,
        batch_buckets: bool = False,
        prefill_chunk: PrefillChunk = "auto",
        overlap: bool | None = None,
        fair: bool = True,
        max_wait_s: float | None = DEFAULT_MAX_WAIT_S,
        progress: bool = True,
        weights: WeightFormat = "bf16",
    ) -> MisoEngine:
        """Load everything from a local directory or a Hub repo id (downloaded once, then cached).

        ``tokenizer`` and ``mimi`` default to the files in the model directory when present
        (``tokenizer.json``; ``mimi.safetensors`` + ``mimi_config.json``), else the Llama-3.2 tokenizer
        mirror and the standard Mimi (kyutai's, downloaded). ``watermark`` is True (SilentCipher from the model
        directory's ``silentcipher/`` when present, else from the Hub), a directory or repo id, or
        False to disable it explicitly.

        ``weights``: the transformers' linear layers in ``dtype`` (``"bf16"``, named for the CUDA
        default; fp32 on CPU unless ``dtype`` says otherwise), or 8-bit: ``"int8"`` (any device) or
        ``"fp8"`` (CUDA, compute capability >= 8.9), quantized while the checkpoint streams in, or read
        as they are from a ``misotts-agents quantize`` checkpoint (model/quantized.py).
        """
        prefill_chunk = parse_prefill_chunk(prefill_chunk)  # a bad setting fails before the weights load
        weights = parse_weights(weights)
        device = torch.device(device) if device is not None else default_device()
        check_supported(weights, device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        config, stored = _load_config(model)
        checkpoint = fetch_file(model, "model.safetensors", "model weights", MAKE_TINY_HINT)
        local = Path(model).expanduser()
        if tokenizer is None:
            tokenizer = local if (local / "tokenizer.json").is_file() else DEFAULT_TOKENIZER
        text_tokenizer = TextTokenizer(fetch_file(tokenizer, "tokenizer.json", "text tokenizer", MAKE_TINY_HINT))
        if mimi is None and (local / "mimi.safetensors").is_file():
            mimi = local
        mimi_model = codec.load_mimi(mimi, device=device, num_codebooks=config.audio_num_codebooks)
        if watermark is False:
            log.warning("watermarking is disabled: generated audio will not carry the SilentCipher mark")
            watermarker = None
        else:
            if watermark is True:
                bundled = local / MODEL_DIR_SUBDIR
                watermark = bundled if (bundled / "hparams.yaml").is_file() else DEFAULT_WATERMARK_SOURCE
            # On the engine's device: on CPU SilentCipher costs ~0.5 core-second per second of audio.
            watermarker = Watermarker.load(watermark, device=str(device), key=watermark_key)
        net = load_model(checkpoint, config, device, dtype, progress, weights=weights, stored=stored)
        engine = cls(
            net,
            text_tokenizer,
            mimi_model,
            watermarker,
            max_batch=max_batch,
            max_queue=max_queue,
            cuda_graphs=cuda_graphs,
            compile=compile,
            batch_buckets=batch_buckets,
            prefill_chunk=prefill_chunk,
            overlap=overlap,
            fair=fair,
            max_wait_s=max_wait_s,
        )
        engine.model_name = str(model)
        return engine

    # -- requests ---------------------------------------------------------------------------

    def stream(
        self, request: SynthesisRequest, *, client: Hashable | None = None, tenant: Hashable | None = None
    ) -> SpeechStream:
        """Submit an utterance; iterate (or async-iterate) the returned stream for its audio chunks.

        ``client`` (any hashable, e.g. a server connection or an integration instance) and ``tenant``
        (whom the client serves, e.g. an API token's tenant) share the engine fairly: preparation
        takes clients in turn, and the scheduler admits waiting requests to slots in turn across
        tenants, then across each tenant's clients, so one caller's burst never delays another's
        first request by more than about one slot's turnover. Without them a request is a client of
        its own.
        """
        if request.watermark and self.watermarker is None:
            raise ModelSourceError("this request asks for a watermark but the engine was loaded without one")
        seed = request.seed if request.seed is not None else secrets.randbits(62)
        marker = self._marker if request.watermark is not False else None
        marking = (marker, StreamWatermarker(marker.watermarker)) if marker is not None else None
        stream = SpeechStream(request, seed, self.num_codebooks, self._scheduler.wake.set, marking)
        job = Job(stream, client=client, tenant=tenant)
        # Check and submit under one lock: concurrent calls cannot all pass the capacity check (and
        # exceed max_queue), and close() (which closes under this lock) sees every submitted job.
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed")
            active, waiting = self._scheduler.load()
            waiting += len(self._unprepared)
            if active + waiting >= self.max_batch + self.max_queue:
                raise EngineBusy(
                    f"engine busy: {active} generating and {waiting} waiting "
                    f"(max_batch={self.max_batch}, max_queue={self.max_queue}); retry later or add capacity"
                )
            self._unprepared.add(job)
            self._prep.submit(client, job)
        return stream

    def synthesize(self, request: SynthesisRequest) -> Synthesis:
        """Generate a whole utterance (streams internally and joins the chunks)."""
        return join_stream(self.stream(request))

    def metrics(self) -> EngineStats:
        """Load and throughput now: active, queued, steps/s, frames/s, cache and outcome counters."""
        with self._lock:
            pending = len(self._unprepared)
        return self._scheduler.stats(pending)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def free_slots(self) -> int:
        return len(self._scheduler.free)

    @property
    def overlap(self) -> bool:
        """Whether each frame step is queued before the one before is read (scheduler.py; default
        on CUDA). It may be switched at any time, e.g. by ``bench --modes no-overlap`` to measure it."""
        return self._scheduler.overlap

    @overlap.setter
    def overlap(self, on: bool) -> None:
        self._scheduler.overlap = bool(on)

    def close(self) -> None:
        """Stop the scheduler; requests still running or waiting end with :class:`EngineClosed`
        (after the chunks already on their way to be watermarked), then the marker's thread."""
        with self._lock:  # from here on stream() refuses; every job it submitted is seen below
            if self._closed:
                return
            self._closed = True
        self._prep.shutdown()
        with self._lock:
            never_prepared, self._unprepared = self._unprepared, set()
        for job in never_prepared:
            self._scheduler.reject(job, EngineClosed("the engine was closed"))
        self._scheduler.stop()
        self._scheduler.executor.decoder.close()
        if self._marker is not None:
            self._marker.close()

    def __enter__(self) -> MisoEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- preparation (prep thread) ----------------------------------------------------------

    def _encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """Mimi codes of a context clip, on CUDA on a stream of this preparation thread's own: its
        copies back wait for the encoding alone, not for the frame steps queued on the scheduler's
        stream, and the encoding runs beside them instead of between them."""
        if self.device.type != "cuda":
            return codec.encode(self.mimi, audio).cpu()
        stream = getattr(self._prep_streams, "stream", None)
        if stream is None:
            stream = self._prep_streams.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            return codec.encode(self.mimi, audio).cpu()  # encode moves the clip to the device

    def _prepare(self, job: Job) -> None:
        stream = job.stream
        request = stream.request
        try:
            if stream.cancelled.is_set():  # skip the work; the scheduler drops and counts it
                self._scheduler.enqueue(job)
                return
            voice_frames = None
            if request.voice is not None:
                job.voice = self.voices.get(request.voice.key)
                if job.voice is None:
                    self.voices.misses += 1
                    tokens, mask = self.prompts.segment_frames(
                        request.voice.speaker, request.voice.text, np.asarray(request.voice.audio)
                    )
                    job.voice = CachedVoice(tokens, mask)
                    self.voices.put(request.voice.key, job.voice)
                else:
                    self.voices.hits += 1
                voice_frames = (job.voice.tokens, job.voice.mask)
            job.prompt = self.prompts.build(
                request.text, request.speaker, request.context, request.max_frames, voice=voice_frames
            )
            stream.stats.prompt_frames = job.prompt.length
            stream.stats.dropped_segments = job.prompt.dropped_segments
            self._scheduler.enqueue(job)
        except Exception as exc:  # bad audio, tokenizer errors...: this request only
            self._scheduler.reject(job, exc)
        finally:
            with self._lock:
                self._unprepared.discard(job)


def _load_config(model: str | Path) -> tuple[ModelConfig, WeightFormat]:
    try:
        return read_config(fetch_file(model, "config.json", "model config", MAKE_TINY_HINT))
    except ModelSourceError:
        if str(model) in KNOWN_CONFIGS:
            return KNOWN_CONFIGS[str(model)], "bf16"
        raise

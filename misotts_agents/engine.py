"""MisoEngine: loads the model, codec, tokenizer and watermarker once and streams utterances.

Every utterance runs in a cache *slot* (a row of the model's KV cache and of Mimi's streaming
state). A stream holds its slot from its first frame to its end, cancel or close, and takes the
model lock for one frame at a time, so several streams interleave frame by frame and a cancelled
stream gives its slot back at the next frame boundary. The batched scheduler builds on the same
slots and model calls.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import codec
from .config import CSM_1B, MAX_SEQ_LEN, MISOTTS_8B, ModelConfig
from .errors import Cancelled, ModelSourceError
from .model import MisoModel
from .prompt import Prompt, PromptBuilder
from .request import AudioChunk, StreamStats, SynthesisRequest
from .sampling import SamplingState
from .sources import DEFAULT_MODEL, DEFAULT_TOKENIZER, fetch_file
from .tokenizer import TextTokenizer
from .watermark import (
    DEFAULT_WATERMARK_KEY,
    DEFAULT_WATERMARK_SOURCE,
    MODEL_DIR_SUBDIR,
    StreamWatermarker,
    Watermarker,
)
from .weights import load_model

log = logging.getLogger(__name__)

# Repos whose config.json may be absent: the reference hard-codes their configuration.
KNOWN_CONFIGS = {DEFAULT_MODEL: MISOTTS_8B, "sesame/csm-1b": CSM_1B}
MAKE_TINY_HINT = "For an offline test model run `misotts-agents make-tiny DIR` and pass --model DIR."


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Synthesis:
    """A whole utterance: audio, the codes that made it, and its figures."""

    pcm: np.ndarray
    codes: np.ndarray  # (frames, K) int
    stats: StreamStats
    sample_rate: int = codec.SAMPLE_RATE


class MisoEngine:
    """The framework-free engine. Thread-safe; share one per process (or per GPU)."""

    def __init__(
        self,
        model: MisoModel,
        tokenizer: TextTokenizer,
        mimi: torch.nn.Module,
        watermarker: Watermarker | None,
        max_streams: int = 1,
    ) -> None:
        if max_streams < 1:
            raise ValueError("max_streams must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.mimi = mimi
        self.watermarker = watermarker
        self.device = model.device
        self.num_codebooks = model.num_codebooks
        self.max_streams = max_streams
        model.setup_caches(max_streams)
        self.decoder = codec.MimiStreamDecoder(mimi, batch_size=max_streams)
        self.prompts = PromptBuilder(tokenizer, self._encode_audio, self.num_codebooks)
        self._model_lock = threading.RLock()
        self._slots_cond = threading.Condition()
        self._free_slots = list(range(max_streams))

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
        max_streams: int = 1,
        progress: bool = True,
    ) -> MisoEngine:
        """Load everything from a local directory or a Hub repo id (downloaded once, then cached).

        ``tokenizer`` and ``mimi`` default to the files in the model directory when present
        (``tokenizer.json``; ``mimi.safetensors`` + ``mimi_config.json``), else the Llama-3.2 tokenizer
        mirror and moshi's standard Mimi. ``watermark`` is True (SilentCipher from the model
        directory's ``silentcipher/`` when present, else from the Hub), a directory or repo id, or
        False to disable it explicitly.
        """
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        config = _load_config(model)
        weights = fetch_file(model, "model.safetensors", "model weights", MAKE_TINY_HINT)
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
            watermarker = Watermarker.load(watermark, device="cpu", key=watermark_key)
        net = load_model(weights, config, device=device, dtype=dtype, progress=progress)
        return cls(net, text_tokenizer, mimi_model, watermarker, max_streams=max_streams)

    # -- requests ---------------------------------------------------------------------------

    def stream(self, request: SynthesisRequest) -> SpeechStream:
        """Start an utterance; iterate (or async-iterate) the result for its audio chunks."""
        if request.watermark and self.watermarker is None:
            raise ModelSourceError("this request asks for a watermark but the engine was loaded without one")
        return SpeechStream(self, request)

    def synthesize(self, request: SynthesisRequest) -> Synthesis:
        """Generate a whole utterance (streams internally and joins the chunks)."""
        stream = self.stream(request)
        chunks = [c.pcm for c in stream]
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
        return Synthesis(pcm=pcm, codes=stream.codes, stats=stream.stats)

    @property
    def free_slots(self) -> int:
        with self._slots_cond:
            return len(self._free_slots)

    # -- internals used by SpeechStream -----------------------------------------------------

    def _encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        with self._model_lock:
            return codec.encode(self.mimi, audio.to(self.device)).cpu()

    def _acquire_slot(self, cancelled: threading.Event) -> int:
        with self._slots_cond:
            while not self._free_slots:
                if cancelled.is_set():
                    raise Cancelled("cancelled while waiting for a free slot")
                self._slots_cond.wait(timeout=0.05)
            return self._free_slots.pop(0)

    def _release_slot(self, slot: int) -> None:
        with self._slots_cond:
            if slot in self._free_slots:
                raise RuntimeError(f"slot {slot} released twice")
            self._free_slots.append(slot)
            self._free_slots.sort()
            self._slots_cond.notify()


def _load_config(model: str | Path) -> ModelConfig:
    try:
        return ModelConfig.load(fetch_file(model, "config.json", "model config", MAKE_TINY_HINT))
    except ModelSourceError:
        if str(model) in KNOWN_CONFIGS:
            return KNOWN_CONFIGS[str(model)]
        raise


class SpeechStream:
    """The audio of one request, produced frame by frame as the caller pulls chunks.

    Iterate it (blocking) or ``async for`` it (each step runs in a worker thread, so the event loop
    never waits on the GPU). ``cancel()`` / ``close()`` from any thread stop it at the next frame and
    free its slot; so do cancelling the task that awaits it and leaving a ``with`` / ``async with``
    block. A consumer that just stops iterating keeps the slot until the stream is garbage-collected,
    so use the context managers (or cancel) when you may stop early.
    """

    def __init__(self, engine: MisoEngine, request: SynthesisRequest) -> None:
        self.engine = engine
        self.request = request
        seed = request.seed if request.seed is not None else secrets.randbits(62)
        self.stats = StreamStats(seed=seed)
        self._cancel = threading.Event()
        self._step_lock = threading.Lock()  # one producer at a time
        self._codes: list[np.ndarray] = []
        self._slot: int | None = None
        self._prompt: Prompt | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_h: torch.Tensor | None = None
        self._sampling: SamplingState | None = None
        self._sizes = request.chunks.sizes()
        self._done = False
        self._t0 = time.perf_counter()
        use_wm = engine.watermarker is not None and request.watermark is not False
        self._watermark = StreamWatermarker(engine.watermarker) if use_wm else None

    # -- public -----------------------------------------------------------------------------

    @property
    def codes(self) -> np.ndarray:
        """The frames generated so far, (frames, K) int64, exactly as the model sampled them."""
        if not self._codes:
            return np.zeros((0, self.engine.num_codebooks), dtype=np.int64)
        return np.stack(self._codes)

    @property
    def done(self) -> bool:
        return self._done

    def cancel(self) -> None:
        """Stop at the next frame boundary and free the slot (now, if no frame is running)."""
        self._cancel.set()
        if self._step_lock.acquire(blocking=False):
            try:
                self._finish("cancelled")
            finally:
                self._step_lock.release()

    close = cancel

    def __enter__(self) -> SpeechStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __iter__(self) -> Iterator[AudioChunk]:
        return self

    def __next__(self) -> AudioChunk:
        with self._step_lock:
            chunk = self._next_chunk()
        if chunk is None:
            raise StopIteration
        return chunk

    def __aiter__(self) -> AsyncIterator[AudioChunk]:
        return self

    async def __anext__(self) -> AudioChunk:
        try:
            chunk = await asyncio.to_thread(self._locked_next)
        except BaseException:
            self.cancel()  # the awaiting task was cancelled, or the step failed: free the slot
            raise
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> SpeechStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        if not self._done and self._slot is not None:
            self.cancel()

    # -- generation -------------------------------------------------------------------------

    def _locked_next(self) -> AudioChunk | None:
        with self._step_lock:
            return self._next_chunk()

    def _next_chunk(self) -> AudioChunk | None:
        if self._done:
            return None
        try:
            if self._slot is None:
                self._start()
            start_frame = self.stats.frames
            want = next(self._sizes)
            pieces = []
            while len(pieces) < want and not self._done:
                if self._cancel.is_set():
                    self._finish("cancelled")
                    break
                pcm = self._step()
                if pcm is not None:
                    pieces.append(pcm)
        except Cancelled:
            self._finish("cancelled")
            return None
        except BaseException:
            self._finish("error")
            raise
        if not pieces:
            return None
        audio = np.concatenate(pieces)
        if self._watermark is not None:
            audio = self._watermark.process(audio)
        if self.stats.time_to_first_audio_s is None:
            self.stats.time_to_first_audio_s = time.perf_counter() - self._t0
        self.stats.elapsed_s = time.perf_counter() - self._t0
        return AudioChunk(audio, start_frame=start_frame, frames=len(pieces), final=self._done)

    def _start(self) -> None:
        engine, request = self.engine, self.request
        prompt = engine.prompts.build(request.text, request.speaker, request.context, request.max_frames)
        self._prompt = prompt
        self.stats.prompt_frames = prompt.length
        self.stats.dropped_segments = prompt.dropped_segments
        self._slot = engine._acquire_slot(self._cancel)
        device = engine.device
        self._sampling = SamplingState.single(request.temperature, request.topk, self.stats.seed, 0, device)
        with engine._model_lock, torch.inference_mode():
            rows = torch.tensor([self._slot], device=device)
            pos = torch.arange(prompt.length, device=device).unsqueeze(0)
            self._last_h = engine.model.backbone_last_hidden(
                prompt.tokens.to(device).unsqueeze(0), prompt.mask.to(device).unsqueeze(0), pos, rows
            )
            engine.decoder.reset([self._slot])

    def _step(self) -> np.ndarray | None:
        """Generate one frame; returns its 1920 samples, or None when the utterance ended instead."""
        engine, k = self.engine, self.engine.num_codebooks
        frame = self.stats.frames
        position = self._prompt.length + frame
        with engine._model_lock, torch.inference_mode():
            rows = torch.tensor([self._slot], device=engine.device)
            if self._pending is not None:
                tokens, mask = self._pending
                pos = torch.full((1, 1), position - 1, device=engine.device)
                self._last_h = engine.model.backbone_last_hidden(tokens, mask, pos, rows)
            self._sampling.frame.fill_(frame)
            codes = engine.model.decode_frame(self._last_h, self._sampling)  # (1, K)
            if not codes.any():
                self._finish("eos")
                return None
            self._codes.append(codes[0].cpu().numpy())
            self.stats.frames = frame + 1
            audio_codes = codes.clone()
            invalid = audio_codes >= codec.CODEBOOK_SIZE
            if invalid.any():
                # Ids 2048..2050 exist in the model's vocabulary but not in Mimi's codebooks: keep
                # them in the model's own history (parity) and hand Mimi a silent-ish 0 instead.
                self.stats.invalid_codes += int(invalid.sum())
                audio_codes[invalid] = 0
            batch = torch.zeros(engine.max_streams, k, dtype=torch.long, device=engine.device)
            batch[self._slot] = audio_codes[0]
            active = torch.zeros(engine.max_streams, dtype=torch.bool, device=engine.device)
            active[self._slot] = True
            pcm = engine.decoder.decode(batch, active)[self._slot].float().cpu().numpy()
            zero = torch.zeros(1, 1, dtype=torch.long, device=engine.device)
            self._pending = (
                torch.cat([codes, zero], dim=1).unsqueeze(1),
                torch.cat([torch.ones_like(codes, dtype=torch.bool), zero.bool()], dim=1).unsqueeze(1),
            )
        if self.stats.frames >= self.request.max_frames:
            self._finish("max_frames")
        elif position + 1 >= MAX_SEQ_LEN:
            self._finish("context_full")
        return pcm

    def _finish(self, reason: str) -> None:
        if self._done:
            return
        self._done = True
        self.stats.stop_reason = reason
        self.stats.elapsed_s = time.perf_counter() - self._t0
        self._pending = self._last_h = None
        if self._slot is not None:
            self.engine._release_slot(self._slot)
        log.debug("stream finished: %s after %d frames", reason, self.stats.frames)

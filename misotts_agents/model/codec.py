"""Mimi audio codec: loading, whole-clip encode/decode, and batched streaming decode.

MisoTTS (like Sesame CSM) speaks in Mimi codes: 32 codebooks x 2048 bins per 80 ms frame at 24 kHz.
This module is the only place that touches moshi's ``MimiModel``; everything else in the package sees
plain tensors of codes and PCM. It is framework-free on purpose (no Pipecat / LiveKit imports) so the
engine, the CLI and the tests can all share it.

Design notes (moshi 0.2.13, verified against its source):

* ``moshi.models.loaders.get_mimi(filename, mimi_config=None, device=..., num_codebooks=8)`` builds the
  model from ``mimi_config`` and then does a *strict* ``load_state_dict``. ``mimi_config`` is not merged
  with defaults: it must be the complete dict with the keys ``sample_rate``, ``channels``, ``frame_rate``
  (top level), ``seanet`` (kwargs of ``SEANetEncoder`` *and* ``SEANetDecoder``), ``transformer`` (kwargs
  of both ``ProjectedTransformer`` s, encoder and decoder) and ``quantizer`` (kwargs of
  ``SplitResidualVectorQuantizer``). ``causal=True`` and ``resample_method="conv"`` are hard-coded by
  get_mimi, and the encoder frame rate is derived as ``sample_rate / prod(seanet ratios)``, so a conv
  down/up-sampler by ``encoder_frame_rate / frame_rate`` is created when they differ.
* Streaming state is per batch row: ``streaming(batch_size)`` allocates it, ``reset_streaming(mask)``
  zeroes chosen rows and ``set_exec_mask(mask)`` makes every streaming sub-module (convs, transposed
  convs, KV caches, RoPE offsets) keep the state of masked-off rows unchanged. So one decode call per
  engine step serves every concurrent stream (:class:`MimiStreamDecoder`).
* On CUDA, moshi wraps the decoder and its transformer in ``CUDAGraphed``: the second call captures a
  graph and every later call must have exactly the same shapes. That is why a decoder has a fixed batch
  size and always decodes exactly one frame per row per call.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel

from misotts_agents.audio import FRAME_SAMPLES, SAMPLE_RATE
from misotts_agents.errors import ModelSourceError
from misotts_agents.model.config import NUM_CODEBOOKS

__all__ = [
    "CODEBOOK_SIZE",
    "CONFIG_FILENAME",
    "NUM_CODEBOOKS",
    "WEIGHTS_FILENAME",
    "CodecUnavailable",
    "MimiModel",
    "MimiStreamDecoder",
    "decode",
    "encode",
    "load_mimi",
    "mimi_config_of",
    "num_frames",
]

CODEBOOK_SIZE = 2048
"""Bins per codebook. The LM's audio vocabulary is larger (2051: it has EOS/padding ids), so codes
>= 2048 can come out of sampling and must be filtered before they reach Mimi."""

WEIGHTS_FILENAME = "mimi.safetensors"
CONFIG_FILENAME = "mimi_config.json"

_DOWNLOAD_HINT = (
    f"Pass a directory holding {WEIGHTS_FILENAME} (plus an optional {CONFIG_FILENAME}), "
    "run `misotts-agents make-tiny DIR` for an offline test model, "
    f"or use the default source to download {loaders.DEFAULT_REPO}/{loaders.MIMI_NAME}."
)
# Stashed on models we build or load, so testing.mimi.save_mimi() can write the matching config without asking.
_CONFIG_ATTR = "misotts_mimi_config"


class CodecUnavailable(ModelSourceError, RuntimeError):
    """The Mimi codec could not be loaded (missing/corrupt weights, bad config, failed download).

    A RuntimeError subclass so callers can catch it specifically and fall back (e.g. to a tiny test
    model), while generic error handling still sees a runtime failure.
    """


def num_frames(num_samples: int) -> int:
    """Number of Mimi frames ``encode`` produces for ``num_samples`` samples: moshi pads the clip up
    to a whole number of frames, so it is ``ceil(num_samples / FRAME_SAMPLES)``."""
    return math.ceil(num_samples / FRAME_SAMPLES)


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def _default_mimi_config() -> dict[str, Any]:
    """A deep copy of moshi's own Mimi config (the one the pretrained checkpoint was trained with)."""
    return copy.deepcopy(loaders._mimi_config)


def mimi_config_of(mimi: MimiModel) -> dict[str, Any] | None:
    """The config a model was built from, when it came from :func:`load_mimi` or
    :func:`misotts_agents.testing.mimi.build_tiny_mimi` (moshi's MimiModel does not remember it itself)."""
    cfg = getattr(mimi, _CONFIG_ATTR, None)
    return copy.deepcopy(cfg) if cfg is not None else None


# --------------------------------------------------------------------------------------------------
# Loading / saving
# --------------------------------------------------------------------------------------------------


def _unavailable(path: Path | str, reason: str) -> CodecUnavailable:
    return CodecUnavailable(f"Cannot load the Mimi codec from {path}: {reason}. {_DOWNLOAD_HINT}")


def _download_default() -> Path:
    """Fetch moshi's standard Mimi checkpoint through huggingface_hub (its cache, progress bar,
    HF_HUB_OFFLINE / HF_HOME / HF_TOKEN handling all apply)."""
    from huggingface_hub import hf_hub_download

    where = f"{loaders.DEFAULT_REPO}/{loaders.MIMI_NAME} (Hugging Face Hub)"
    try:
        return Path(hf_hub_download(loaders.DEFAULT_REPO, loaders.MIMI_NAME))
    except Exception as exc:  # network, offline mode without cache, auth, disk full, ...
        raise _unavailable(where, f"download failed ({type(exc).__name__}: {exc})") from exc


def _resolve_source(source: str | Path | None) -> tuple[Path, Path | None]:
    """Map ``source`` to (weights file, optional config file), raising CodecUnavailable early with a
    message that names the path the user gave."""
    if source is None or (isinstance(source, str) and source == "default"):
        return _download_default(), None
    path = Path(source).expanduser()
    if path.is_dir():
        weights = path / WEIGHTS_FILENAME
        if not weights.is_file():
            # Also accept a directory holding moshi's checkpoint under its original name.
            alt = path / loaders.MIMI_NAME
            if not alt.is_file():
                raise _unavailable(path, f"the directory has no {WEIGHTS_FILENAME}")
            weights = alt
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise _unavailable(path, "expected a directory or a .safetensors file")
        weights = path
    else:
        raise _unavailable(path, "no such file or directory")
    config = weights.parent / CONFIG_FILENAME
    return weights, config if config.is_file() else None


def _read_config(config_path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise _unavailable(config_path, f"unreadable config ({exc})") from exc
    missing = {"sample_rate", "channels", "frame_rate", "seanet", "transformer", "quantizer"} - set(cfg)
    if not isinstance(cfg, dict) or missing:
        raise _unavailable(config_path, f"config is missing the keys {sorted(missing)}")
    return cfg


def _check_interface(mimi: MimiModel, where: Path | str, num_codebooks: int) -> None:
    """Reject configs that would silently change shapes downstream (the LM emits 2048-bin codes for
    1920-sample frames at 24 kHz; nothing else in the package adapts to other values)."""
    problems = []
    if mimi.sample_rate != SAMPLE_RATE:
        problems.append(f"sample_rate {mimi.sample_rate} != {SAMPLE_RATE}")
    if mimi.frame_size != FRAME_SAMPLES:
        problems.append(f"frame size {mimi.frame_size} != {FRAME_SAMPLES}")
    if mimi.cardinality != CODEBOOK_SIZE:
        problems.append(f"codebook size {mimi.cardinality} != {CODEBOOK_SIZE}")
    if mimi.total_codebooks < num_codebooks:
        problems.append(f"only {mimi.total_codebooks} codebooks, {num_codebooks} requested")
    if problems:
        raise _unavailable(where, "incompatible Mimi: " + "; ".join(problems))


def load_mimi(
    source: str | Path | None,
    device: torch.device | str = "cpu",
    num_codebooks: int = NUM_CODEBOOKS,
) -> MimiModel:
    """Load a Mimi codec in eval mode with ``num_codebooks`` active codebooks.

    ``source``:
      * ``None`` or ``"default"``: moshi's pretrained Mimi (``kyutai/moshiko-pytorch-bf16``,
        ``tokenizer-e351c8d8-checkpoint125.safetensors``) via huggingface_hub's cache/download.
      * a directory: ``mimi.safetensors`` in it (or moshi's original file name), plus an optional
        ``mimi_config.json`` with the full dict moshi's ``get_mimi(mimi_config=...)`` takes (see the
        module docstring for its keys); without it moshi's standard config is used.
      * a ``.safetensors`` file: loaded directly; a ``mimi_config.json`` next to it is used if present.

    Every failure (missing or corrupt file, config not matching the weights, failed download) raises
    :class:`CodecUnavailable` naming the path and the fixes, so the CLI and the engine can report one
    actionable error instead of a moshi assertion or a size-mismatch traceback.
    """
    if not 1 <= num_codebooks <= NUM_CODEBOOKS:
        raise ValueError(f"num_codebooks must be in 1..{NUM_CODEBOOKS}, got {num_codebooks}")
    weights, config_path = _resolve_source(source)
    cfg = _read_config(config_path) if config_path is not None else _default_mimi_config()
    try:
        mimi = loaders.get_mimi(weights, mimi_config=cfg, device=device, num_codebooks=num_codebooks)
    except Exception as exc:  # safetensors header errors, strict load_state_dict, bad config kwargs
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {detail}"[:500]
        if config_path is not None:
            reason += f" (with config {config_path})"
        raise _unavailable(weights, reason) from exc
    _check_interface(mimi, weights, num_codebooks)
    mimi.eval()
    setattr(mimi, _CONFIG_ATTR, copy.deepcopy(cfg))
    return mimi


# --------------------------------------------------------------------------------------------------
# Whole-clip encode / decode
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _outside_streaming(mimi: MimiModel) -> Iterator[None]:
    """Temporarily lift a live streaming state (e.g. a MimiStreamDecoder's) off ``mimi``.

    In streaming mode moshi routes ``encode``/``decode`` through the per-row streaming state (fixed
    batch size, frame-multiple inputs, state updates), so a whole-clip call on a Mimi that a decoder is
    using would corrupt that decoder. Not thread-safe against a concurrent streaming decode.
    """
    if not mimi.is_streaming:
        yield
        return
    saved = mimi.get_streaming_state()
    mimi._stop_streaming()
    try:
        yield
    finally:
        mimi.set_streaming_state(saved)


def _param_of(mimi: MimiModel) -> torch.Tensor:
    return next(mimi.parameters())


def encode(mimi: MimiModel, audio: torch.Tensor) -> torch.Tensor:
    """Encode a whole mono 24 kHz clip to codes.

    ``audio``: 1-D float tensor of samples. Returns int64 codes (K, T) on the model's device, with
    K = ``mimi.num_codebooks`` and T = ``ceil(len(audio) / 1920)`` (moshi zero-pads the tail frame).
    Non-streaming: one pass over the clip, which is what voice prompts / context segments need.
    """
    if audio.dim() != 1:
        raise ValueError(f"encode expects 1-D mono audio, got shape {tuple(audio.shape)}")
    if audio.numel() == 0:
        raise ValueError("encode got an empty clip")
    if not audio.dtype.is_floating_point:
        raise ValueError(f"encode expects float samples, got {audio.dtype}")
    param = _param_of(mimi)
    x = audio.to(device=param.device, dtype=param.dtype)[None, None]
    with torch.inference_mode(), _outside_streaming(mimi):
        codes = mimi.encode(x)
    return codes[0].to(torch.int64)


def _check_codes(codes: torch.Tensor) -> None:
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
        raise ValueError(f"Mimi codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and bool(((codes < 0) | (codes >= CODEBOOK_SIZE)).any()):
        bad = codes[(codes < 0) | (codes >= CODEBOOK_SIZE)]
        raise ValueError(
            f"Mimi codes must be in 0..{CODEBOOK_SIZE - 1}, got {bad.unique()[:8].tolist()}; "
            "the LM's EOS/padding ids (>= 2048) must be filtered out before decoding"
        )


def decode(mimi: MimiModel, codes: torch.Tensor) -> torch.Tensor:
    """Decode a whole clip of codes (K, T) to float32 PCM (T * 1920,) in one non-streaming pass.

    Equal (to float rounding) to streaming the same frames through a fresh :class:`MimiStreamDecoder`,
    since Mimi is causal with no lookahead.
    """
    if codes.dim() != 2:
        raise ValueError(f"decode expects codes of shape (K, T), got {tuple(codes.shape)}")
    _check_codes(codes)
    param = _param_of(mimi)
    with torch.inference_mode(), _outside_streaming(mimi):
        pcm = mimi.decode(codes.to(device=param.device, dtype=torch.int64)[None])
    return pcm[0, 0].float()


# --------------------------------------------------------------------------------------------------
# Batched streaming decode
# --------------------------------------------------------------------------------------------------


class MimiStreamDecoder:
    """Streaming Mimi decode for a fixed number of rows, one 80 ms frame per row per call.

    Each row is an independent stream (one utterance at a time) sharing a single batched decode call,
    so a continuous-batching engine pays one Mimi call per step instead of one per stream. Built on
    moshi's per-row streaming state: ``reset`` zeroes chosen rows (a new utterance), and rows left out
    of ``active`` are masked with ``set_exec_mask`` so their conv/KV-cache/position state stays exactly
    as it was, as if that step never happened.

    The batch size is fixed for the decoder's life because on CUDA moshi CUDA-graphs the decoder and
    every later call must repeat the captured shapes. A MimiModel can hold only one streaming state,
    so only one decoder per model may be open at a time; ``close()`` (or ``with``) releases it.
    Whole-clip :func:`encode` / :func:`decode` on the same model remain safe between calls. Not
    thread-safe: drive it from one thread (the engine's step loop).
    """

    def __init__(self, mimi: MimiModel, batch_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mimi.is_streaming:
            raise RuntimeError(
                "this MimiModel is already streaming (another MimiStreamDecoder is open on it); "
                "close that one first or load a second model"
            )
        self.mimi = mimi
        self.batch_size = batch_size
        self.device = _param_of(mimi).device
        with torch.inference_mode():
            # streaming() starts streaming immediately and returns an ExitStack whose close() stops it.
            self._stack: contextlib.ExitStack | None = mimi.streaming(batch_size)
        self._all_rows = torch.ones(batch_size, dtype=torch.bool, device=self.device)

    @property
    def num_codebooks(self) -> int:
        """Codebooks expected per frame (the model's active count)."""
        return int(self.mimi.num_codebooks)

    @property
    def closed(self) -> bool:
        return self._stack is None

    def _require_open(self) -> None:
        if self._stack is None:
            raise RuntimeError("MimiStreamDecoder is closed")

    def _row_mask(self, rows: Sequence[int] | None) -> torch.Tensor:
        if rows is None:
            return self._all_rows
        mask = torch.zeros(self.batch_size, dtype=torch.bool)
        for row in rows:
            if not 0 <= int(row) < self.batch_size:
                raise IndexError(f"row {row} out of range for batch_size {self.batch_size}")
            mask[int(row)] = True
        if self.device.type == "cuda":  # from pinned memory: the copy is queued, the host does not wait
            mask = mask.pin_memory()
        return mask.to(self.device, non_blocking=True)

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Start a new utterance in ``rows`` (all rows if None): their state becomes that of a fresh
        decoder, the other rows are untouched."""
        self._require_open()
        mask = self._row_mask(rows)
        with torch.inference_mode():
            self.mimi.reset_streaming(mask)

    def _active_mask(self, active: torch.Tensor | Sequence[bool] | None) -> torch.Tensor:
        if active is None:
            return self._all_rows
        mask = torch.as_tensor(active, device=self.device)
        if mask.dtype != torch.bool or mask.shape != (self.batch_size,):
            raise ValueError(
                f"active must be a bool mask of shape ({self.batch_size},), got {mask.dtype} {tuple(mask.shape)}"
            )
        return mask

    def decode(
        self, codes: torch.Tensor, active: torch.Tensor | Sequence[bool] | None = None, validate: bool = True
    ) -> torch.Tensor:
        """Decode one frame for every row.

        ``codes``: integer (B, K), B == batch_size, K == num_codebooks, values in 0..2047 for active
        rows (inactive rows may hold anything, e.g. padding; they are replaced by 0 before decoding).
        ``active``: optional bool mask (B,); rows that are False keep their streaming state unchanged
        and get zeros in the output. Returns float32 PCM (B, 1920) on the model's device.
        Raises ValueError on out-of-range codes: the engine must drop EOS/padding ids first; this is
        the last line of defence before an out-of-bounds embedding lookup (a hard crash on CUDA).
        ``validate=False`` skips that check and the all-rows-inactive shortcut, both of which read
        the device: for a caller that has just mapped its codes into range (the frame step, whose
        host must not wait for the step before it queues Mimi).
        """
        self._require_open()
        if codes.dim() != 2 or codes.shape != (self.batch_size, self.num_codebooks):
            raise ValueError(
                f"codes must have shape ({self.batch_size}, {self.num_codebooks}) "
                f"(one frame per row), got {tuple(codes.shape)}"
            )
        mask = self._active_mask(active)
        codes = codes.to(self.device)
        if active is not None:
            codes = torch.where(mask[:, None], codes, torch.zeros_like(codes))
        if validate:
            _check_codes(codes)
        if validate and active is not None and not bool(mask.any()):
            # Nothing to run: skipping leaves every row's state untouched, same as an all-False mask.
            return torch.zeros(self.batch_size, FRAME_SAMPLES, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            self.mimi.set_exec_mask(mask)
            pcm = self.mimi.decode(codes.to(torch.int64)[:, :, None])  # (B, 1, 1920)
        pcm = pcm[:, 0].float()
        if active is not None:
            pcm = torch.where(mask[:, None], pcm, torch.zeros_like(pcm))
        return pcm

    def warm_up(self, calls: int = 3) -> None:
        """Run ``calls`` decodes with every row inactive (no row's state changes): on CUDA moshi
        captures its decoder's graphs on the second call it sees, in global capture mode, during
        which any other thread's CUDA work fails; doing that now, before any request, means no
        request's first frame pays for the capture or collides with another thread's work."""
        self._require_open()
        idle = torch.zeros(self.batch_size, self.num_codebooks, dtype=torch.long, device=self.device)
        inactive = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        for _ in range(calls):
            self.decode(idle, inactive, validate=False)

    def close(self) -> None:
        """Drop the streaming state so the model can be used by another decoder. Idempotent."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

"""Mimi audio codec: loading, and whole-clip encode/decode (the batched streaming decode: mimi_stream.py).

MisoTTS (like Sesame CSM) speaks in Mimi codes: 32 codebooks x 2048 bins per 80 ms frame at 24 kHz.
The network is our own (:mod:`misotts_agents.model.mimi`, proven exact against kyutai's moshi package,
which stays a test oracle: its stale dependency caps cannot travel in our wheel). This module is what the
rest of the package calls: it resolves and strictly loads the official checkpoint, validates inputs,
and is what the streaming decoder (mimi_stream.py) builds on. Framework-free (no Pipecat / LiveKit imports).

* The checkpoint is moshi's file (``kyutai/moshiko-pytorch-bf16``,
  ``tokenizer-e351c8d8-checkpoint125.safetensors``) under moshi's key names, or a directory holding
  ``mimi.safetensors`` plus an optional ``mimi_config.json`` in moshi's config layout (``sample_rate``,
  ``channels``, ``frame_rate``, ``seanet``, ``transformer``, ``quantizer``), which is how make-tiny
  writes a small one. A missing, unexpected or mis-shaped tensor is an error naming it.
* The model holds no streaming state: a :class:`~misotts_agents.model.mimi_stream.MimiStreamDecoder`
  owns its rows' state (:class:`~misotts_agents.model.mimi.DecodeState`), so whole-clip calls
  (context audio, on preparation threads) and any number of decoders share one set of weights safely.
* On CUDA the decoder captures one CUDA graph per batch shape at start-up (``MimiStreamDecoder.warm_up``),
  in thread-local capture mode: other threads' GPU work neither breaks the capture nor waits for it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from misotts_agents.audio import FRAME_SAMPLES, SAMPLE_RATE
from misotts_agents.errors import ModelSourceError
from misotts_agents.model.config import NUM_CODEBOOKS
from misotts_agents.model.mimi import MimiModel, default_config, rename_checkpoint_keys

__all__ = [
    "CODEBOOK_SIZE",
    "CONFIG_FILENAME",
    "MIMI_FILENAME",
    "MIMI_REPO",
    "NUM_CODEBOOKS",
    "WEIGHTS_FILENAME",
    "CodecUnavailable",
    "MimiModel",
    "decode",
    "encode",
    "load_mimi",
    "mimi_config_of",
    "num_frames",
    "save_mimi",
]

log = logging.getLogger(__name__)

CODEBOOK_SIZE = 2048
"""Bins per codebook. The LM's audio vocabulary is larger (2051: it has EOS/padding ids), so codes
>= 2048 can come out of sampling and must be filtered before they reach Mimi."""

WEIGHTS_FILENAME = "mimi.safetensors"
CONFIG_FILENAME = "mimi_config.json"

#: Where the standard Mimi checkpoint lives on the Hugging Face Hub (the one CSM and MisoTTS load).
MIMI_REPO = "kyutai/moshiko-pytorch-bf16"
MIMI_FILENAME = "tokenizer-e351c8d8-checkpoint125.safetensors"

_DOWNLOAD_HINT = (
    f"Pass a directory holding {WEIGHTS_FILENAME} (plus an optional {CONFIG_FILENAME}), "
    "run `misotts-agents make-tiny DIR` for an offline test model, "
    f"or use the default source to download {MIMI_REPO}/{MIMI_FILENAME}."
)


class CodecUnavailable(ModelSourceError, RuntimeError):
    """The Mimi codec could not be loaded (missing/corrupt weights, bad config, failed download).

    A RuntimeError subclass so callers can catch it specifically and fall back (e.g. to a tiny test
    model), while generic error handling still sees a runtime failure.
    """


def num_frames(num_samples: int) -> int:
    """Number of Mimi frames ``encode`` produces for ``num_samples`` samples: the clip is padded up
    to a whole number of frames, so it is ``ceil(num_samples / FRAME_SAMPLES)``."""
    return math.ceil(num_samples / FRAME_SAMPLES)


def mimi_config_of(mimi: MimiModel) -> dict[str, Any]:
    """The config (moshi's layout) a model was built from: what ``mimi_config.json`` holds."""
    return mimi.config


# --------------------------------------------------------------------------------------------------
# Loading / saving
# --------------------------------------------------------------------------------------------------


def _unavailable(path: Path | str, reason: str) -> CodecUnavailable:
    return CodecUnavailable(f"Cannot load the Mimi codec from {path}: {reason}. {_DOWNLOAD_HINT}")


def _download_default() -> Path:
    """Fetch the standard Mimi checkpoint through huggingface_hub (its cache, progress bar,
    HF_HUB_OFFLINE / HF_HOME / HF_TOKEN handling all apply)."""
    from huggingface_hub import hf_hub_download

    where = f"{MIMI_REPO}/{MIMI_FILENAME} (Hugging Face Hub)"
    try:
        return Path(hf_hub_download(MIMI_REPO, MIMI_FILENAME))
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
            # Also accept a directory holding the Hub's checkpoint under its original name.
            alt = path / MIMI_FILENAME
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
    if not isinstance(cfg, dict):
        raise _unavailable(config_path, "the config is not a JSON object")
    missing = {"sample_rate", "channels", "frame_rate", "seanet", "transformer", "quantizer"} - set(cfg)
    if missing:
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


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(weights))
    except Exception as exc:  # truncated file, bad header, not a safetensors file
        raise _unavailable(weights, f"unreadable safetensors file ({type(exc).__name__}: {exc})") from exc


def _check_keys(mimi: MimiModel, tensors: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with ``tensors`` as the model's state dict, in words naming the keys; None if nothing.

    Strict: every tensor the model has must be there with its shape, and nothing else may be (a
    checkpoint of another model must not load partially)."""
    expected = {name: tuple(t.shape) for name, t in mimi.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    shapes = sorted(
        f"{name} (checkpoint {tuple(tensors[name].shape)}, model {shape})"
        for name, shape in expected.items()
        if name in tensors and tuple(tensors[name].shape) != shape
    )
    problems = []
    for what, names in (("missing keys", missing), ("unexpected keys", extra), ("mis-shaped tensors", shapes)):
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            problems.append(f"{len(names)} {what}: {', '.join(names[:5])}{more}")
    return "; ".join(problems) or None


def load_mimi(
    source: str | Path | None,
    device: torch.device | str = "cpu",
    num_codebooks: int = NUM_CODEBOOKS,
) -> MimiModel:
    """Load a Mimi codec in eval mode (fp32) with ``num_codebooks`` active codebooks.

    ``source``:
      * ``None`` or ``"default"``: the pretrained Mimi (``kyutai/moshiko-pytorch-bf16``,
        ``tokenizer-e351c8d8-checkpoint125.safetensors``) via huggingface_hub's cache/download.
      * a directory: ``mimi.safetensors`` in it (or the Hub's original file name), plus an optional
        ``mimi_config.json`` in moshi's config layout (see the module docstring); without it the
        standard config is used.
      * a ``.safetensors`` file: loaded directly; a ``mimi_config.json`` next to it is used if present.

    Every failure (missing or corrupt file, a config we cannot build, tensors not matching the model,
    failed download) raises :class:`CodecUnavailable` naming the path and the fixes.
    """
    if not 1 <= num_codebooks <= NUM_CODEBOOKS:
        raise ValueError(f"num_codebooks must be in 1..{NUM_CODEBOOKS}, got {num_codebooks}")
    weights, config_path = _resolve_source(source)
    cfg = _read_config(config_path) if config_path is not None else default_config()
    with_config = f" (with config {config_path})" if config_path is not None else ""
    try:
        with torch.device(device):
            mimi = MimiModel(cfg, num_codebooks=num_codebooks)
    except (ValueError, TypeError, KeyError) as exc:
        raise _unavailable(weights, f"unusable config: {exc}{with_config}") from exc
    _check_interface(mimi, weights, num_codebooks)
    # kyutai's file names attention projections ``self_attn.in_proj_weight`` / ``out_proj.weight``
    tensors = rename_checkpoint_keys(_read_weights(weights))
    problem = _check_keys(mimi, tensors)
    if problem is not None:
        raise _unavailable(weights, f"the checkpoint does not match the model: {problem}{with_config}")
    mimi.load_state_dict(tensors, strict=True)  # copied into the model's fp32 tensors on its device
    return mimi.eval().requires_grad_(False)


def _released_name(name: str) -> str:
    """The name kyutai's checkpoint gives a tensor that our (and moshi's) state dict names ``name``."""
    return name.replace("self_attn.in_projs.0.weight", "self_attn.in_proj_weight").replace(
        "self_attn.out_projs.0.weight", "self_attn.out_proj.weight"
    )


def save_mimi(mimi: MimiModel, directory: Path | str) -> Path:
    """Write ``mimi.safetensors`` + ``mimi_config.json`` so ``load_mimi(directory)`` rebuilds ``mimi``.

    The whole state dict is saved, codebook buffers (``embedding_sum``, ``cluster_usage``,
    ``_initialized``) included, under the released file's key names (its attention projections as
    ``self_attn.in_proj_weight`` / ``self_attn.out_proj.weight``), so make-tiny writes what the Hub
    holds. Returns the directory.
    """
    from safetensors.torch import save_file

    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    state = {_released_name(name): t.detach().to("cpu").contiguous() for name, t in mimi.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILENAME))
    (directory / CONFIG_FILENAME).write_text(json.dumps(mimi.config, indent=2, sort_keys=True) + "\n")
    return directory


# --------------------------------------------------------------------------------------------------
# Whole-clip encode / decode
# --------------------------------------------------------------------------------------------------


def _param_of(mimi: MimiModel) -> torch.Tensor:
    return next(mimi.parameters())


def encode(mimi: MimiModel, audio: torch.Tensor) -> torch.Tensor:
    """Encode a whole mono 24 kHz clip to codes.

    ``audio``: 1-D float tensor of samples. Returns int64 codes (K, T) on the model's device, with
    K = ``mimi.num_codebooks`` and T = ``ceil(len(audio) / 1920)`` (the tail frame is zero-padded).
    Non-streaming: one pass over the clip, which is what voice prompts / context segments need.
    Safe from any thread, beside a streaming decoder of the same model.
    """
    if audio.dim() != 1:
        raise ValueError(f"encode expects 1-D mono audio, got shape {tuple(audio.shape)}")
    if audio.numel() == 0:
        raise ValueError("encode got an empty clip")
    if not audio.dtype.is_floating_point:
        raise ValueError(f"encode expects float samples, got {audio.dtype}")
    param = _param_of(mimi)
    x = audio.to(device=param.device, dtype=param.dtype)[None, None]
    with torch.inference_mode():
        codes = mimi.encode(x)
    return codes[0].to(torch.int64)


def check_codes(codes: torch.Tensor) -> None:
    """Refuse codes Mimi cannot decode: not integers, or outside its 2048 bins."""
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

    Equal (to float rounding) to streaming the same frames through a fresh ``MimiStreamDecoder``,
    since Mimi is causal with no lookahead.
    """
    if codes.dim() != 2:
        raise ValueError(f"decode expects codes of shape (K, T), got {tuple(codes.shape)}")
    if codes.shape[0] != mimi.num_codebooks:
        raise ValueError(f"decode expects {mimi.num_codebooks} codebooks, got {codes.shape[0]}")
    check_codes(codes)
    param = _param_of(mimi)
    with torch.inference_mode():
        pcm = mimi.decode(codes.to(device=param.device, dtype=torch.int64)[None])
    return pcm[0, 0].float()

"""The audio every layer shares: MisoTTS's rate and frame, 16-bit PCM, down-mixing and WAV files.

Defined here once and imported everywhere (model, engine, server, client, integrations). Light to
import on purpose, so that the server's client loads no model code: numpy and soxr only, torch
recognised without importing it, soundfile imported when a file is read or written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import numpy as np
import soxr

from misotts_agents.errors import InvalidRequest

if TYPE_CHECKING:
    import torch

SAMPLE_RATE = 24_000
"""Mimi's (and so MisoTTS's) sample rate, Hz: every clip in and out of the engine is at this rate."""
FRAME_MS = 80
"""One Mimi frame: the unit the model generates and the stream counts in."""
FRAME_S = FRAME_MS / 1000
"""One frame in seconds (0.08)."""
FRAME_RATE = 1000 / FRAME_MS
"""Frames a second (12.5)."""
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000
"""Samples in one frame (1920)."""
PCM16_SCALE = 32767.0
"""Full scale of 16-bit PCM: float 1.0 <-> 32767 (the same both ways, so a round trip is exact)."""
MAX_CHANNELS = 8


def to_int16(pcm: np.ndarray) -> bytes:
    """Float audio in [-1, 1] (clipped) as 16-bit little-endian PCM bytes: what goes on every wire."""
    return (np.clip(pcm, -1.0, 1.0) * PCM16_SCALE).astype("<i2").tobytes()


def from_int16(data: bytes | memoryview) -> np.ndarray:
    """16-bit little-endian PCM bytes as float32 audio in [-1, 1]."""
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / PCM16_SCALE


def _is_tensor(audio: Any) -> TypeGuard[torch.Tensor]:
    # torch is not imported here: an object can only be a tensor if the caller already loaded torch.
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(audio, torch_module.Tensor)


def _check_finite(audio: np.ndarray, what: str) -> None:
    if not np.isfinite(audio).all():
        raise InvalidRequest(f"{what}: the clip contains NaN or infinite samples")


def to_mono(
    audio: np.ndarray | torch.Tensor, sample_rate: int, what: str = "audio", resample: bool = True
) -> np.ndarray:
    """Any numeric mono or multi-channel clip -> validated float32 mono at ``SAMPLE_RATE``
    (at ``sample_rate`` when ``resample`` is False: for callers that resample a stream themselves).

    2-D input may be (channels, samples) or (samples, channels): the short axis (<= 8) is taken as
    channels and averaged. Integer PCM is scaled to [-1, 1]. Empty, NaN or infinite audio is an error.
    """
    # A name of its own: under the parameter's declared type, a numpy result typed Any (mean, soxr)
    # would read as "array or tensor" again.
    samples: np.ndarray = np.asarray(audio.detach().to("cpu").numpy() if _is_tensor(audio) else audio)
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise InvalidRequest(f"{what}: sample rate must be a positive integer, got {sample_rate!r}")
    if samples.dtype.kind in "iu":
        samples = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max)
    elif samples.dtype.kind != "f":
        raise InvalidRequest(f"{what}: expected numeric samples, got dtype {samples.dtype}")
    if samples.ndim == 2:
        channel_axis = 0 if samples.shape[0] <= samples.shape[1] else 1
        if samples.shape[channel_axis] > MAX_CHANNELS:
            raise InvalidRequest(f"{what}: cannot tell channels from samples in shape {samples.shape}")
        samples = samples.mean(axis=channel_axis)
    elif samples.ndim != 1:
        raise InvalidRequest(f"{what}: expected 1-D mono or 2-D multi-channel audio, got shape {samples.shape}")
    if samples.size == 0:
        raise InvalidRequest(f"{what}: the clip is empty")
    _check_finite(samples, what)
    samples = samples.astype(np.float32, copy=False)
    if resample and sample_rate != SAMPLE_RATE:
        samples = soxr.resample(samples, sample_rate, SAMPLE_RATE).astype(np.float32, copy=False)
    return np.ascontiguousarray(samples)


def check_mono_float(audio: Any, what: str = "audio") -> np.ndarray:
    """``audio`` as an ndarray once checked to be mono (1-D), floating-point and finite; unlike
    :func:`to_mono` nothing is converted (dtype and length kept, empty allowed), for callers that
    must hand back audio exactly as they got it (the watermark)."""
    arr = np.asarray(audio)
    if arr.ndim != 1:
        raise InvalidRequest(f"{what} must be mono 1-D audio, got an array of shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InvalidRequest(f"{what} must be floating-point audio in [-1, 1], got dtype {arr.dtype}")
    _check_finite(arr, what)
    return arr


def read_audio(path: str | Path) -> np.ndarray:
    """Read a WAV/FLAC/OGG file as float32 mono at 24 kHz."""
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise InvalidRequest(f"cannot read audio file {path}: {exc}") from exc
    return to_mono(data, rate, what=str(path))


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write float audio as 16-bit PCM WAV."""
    import soundfile as sf

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16")

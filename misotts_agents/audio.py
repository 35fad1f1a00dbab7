"""Audio in and out: validation, down-mixing, resampling (soxr) and WAV files (soundfile)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from misotts_agents.errors import InvalidRequest

SAMPLE_RATE = 24_000
MAX_CHANNELS = 8


def to_mono(
    audio: np.ndarray | torch.Tensor, sample_rate: int, what: str = "audio", resample: bool = True
) -> np.ndarray:
    """Any numeric mono or multi-channel clip -> validated float32 mono at ``SAMPLE_RATE``
    (at ``sample_rate`` when ``resample`` is False: for callers that resample a stream themselves).

    2-D input may be (channels, samples) or (samples, channels): the short axis (<= 8) is taken as
    channels and averaged. Integer PCM is scaled to [-1, 1]. Empty, NaN or infinite audio is an error.
    """
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().to("cpu").numpy()
    audio = np.asarray(audio)
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise InvalidRequest(f"{what}: sample rate must be a positive integer, got {sample_rate!r}")
    if audio.dtype.kind in "iu":
        audio = audio.astype(np.float32) / float(np.iinfo(audio.dtype).max)
    elif audio.dtype.kind != "f":
        raise InvalidRequest(f"{what}: expected numeric samples, got dtype {audio.dtype}")
    if audio.ndim == 2:
        channel_axis = 0 if audio.shape[0] <= audio.shape[1] else 1
        if audio.shape[channel_axis] > MAX_CHANNELS:
            raise InvalidRequest(f"{what}: cannot tell channels from samples in shape {audio.shape}")
        audio = audio.mean(axis=channel_axis)
    elif audio.ndim != 1:
        raise InvalidRequest(f"{what}: expected 1-D mono or 2-D multi-channel audio, got shape {audio.shape}")
    if audio.size == 0:
        raise InvalidRequest(f"{what}: the clip is empty")
    if not np.isfinite(audio).all():
        raise InvalidRequest(f"{what}: the clip contains NaN or infinite samples")
    audio = audio.astype(np.float32, copy=False)
    if resample and sample_rate != SAMPLE_RATE:
        audio = soxr.resample(audio, sample_rate, SAMPLE_RATE).astype(np.float32, copy=False)
    return np.ascontiguousarray(audio)


def read_audio(path: str | Path) -> np.ndarray:
    """Read a WAV/FLAC/OGG file as float32 mono at 24 kHz."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise InvalidRequest(f"cannot read audio file {path}: {exc}") from exc
    return to_mono(data, rate, what=str(path))


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write float audio as 16-bit PCM WAV."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16")

"""Reading a SilentCipher checkpoint directory: ``hparams.yaml`` and the three ``.ckpt`` state dicts.

The directory is the one the package's ``get_model`` reads (``44_1_khz/73999_iteration`` of
``sony/silentcipher``).  Only the hyper-parameters that change what inference computes are read,
and the ones whose other values this port does not implement are refused here, with the key named,
rather than producing different audio later.  The state dicts must match the networks key for key
and shape for shape: a partial load would silently watermark with random weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from misotts_agents.errors import CheckpointError, ModelSourceError
from misotts_agents.model.silentcipher.message import MESSAGE_DIM, MESSAGE_LEN

HPARAMS_FILE = "hparams.yaml"
ENCODER_FILE = "enc_c.ckpt"
CARRIER_DECODER_FILE = "dec_c.ckpt"
MESSAGE_DECODER_FILE = "dec_m_0.ckpt"
CHECKPOINT_FILES = (ENCODER_FILE, CARRIER_DECODER_FILE, MESSAGE_DECODER_FILE)

# hparams that must have exactly these values: the branches of the package's encode that this port
# implements (the 44.1 kHz model's), and the message format.
_REQUIRED_VALUES: dict[str, Any] = {
    "message_dim": MESSAGE_DIM,
    "message_len": MESSAGE_LEN,
    "n_messages": 1,
    "ensure_negative_message": True,
    "frame_level_normalization": False,
    "utterance_level_normalization": True,
    "no_normalization": False,
}


@dataclass(frozen=True)
class SilentCipherConfig:
    """The hyper-parameters inference depends on, from ``hparams.yaml``."""

    sample_rate: int
    n_fft: int
    hop_length: int
    message_band_size: int
    enc_n_layers: int
    dec_c_n_layers: int
    #: The checkpoint's default strength (47 for the 44.1 kHz model); the reference passes 36.
    message_sdr: float

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1


def _positive_int(hparams: Mapping[str, Any], key: str, where: Path) -> int:
    value = hparams[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def config_from_hparams(hparams: Mapping[str, Any], where: Path) -> SilentCipherConfig:
    """Validate the parsed ``hparams.yaml`` (``where`` names it in errors) and keep what inference uses."""
    needed = ["SR", "N_FFT", "HOP_LENGTH", "message_band_size", "enc_n_layers", "dec_c_n_layers", "message_sdr"]
    missing = [key for key in [*needed, *_REQUIRED_VALUES] if key not in hparams]
    if missing:
        raise CheckpointError(f"{where} lacks the key(s) {', '.join(missing)}")
    wrong = [
        f"{key} is {hparams[key]!r}, expected {value!r}"
        for key, value in _REQUIRED_VALUES.items()
        if hparams[key] != value or type(hparams[key]) is not type(value)
    ]
    if wrong:
        raise CheckpointError(f"{where} describes a SilentCipher model this port does not run: {'; '.join(wrong)}")
    config = SilentCipherConfig(
        sample_rate=_positive_int(hparams, "SR", where),
        n_fft=_positive_int(hparams, "N_FFT", where),
        hop_length=_positive_int(hparams, "HOP_LENGTH", where),
        message_band_size=_positive_int(hparams, "message_band_size", where),
        enc_n_layers=_positive_int(hparams, "enc_n_layers", where),
        dec_c_n_layers=_positive_int(hparams, "dec_c_n_layers", where),
        message_sdr=float(hparams["message_sdr"]),
    )
    if config.message_band_size > config.n_bins:
        raise CheckpointError(f"{where}: message_band_size {config.message_band_size} exceeds {config.n_bins} bins")
    if config.enc_n_layers < 2 or config.dec_c_n_layers < 2:
        raise CheckpointError(f"{where}: enc_n_layers and dec_c_n_layers must be at least 2")
    return config


def read_hparams(directory: Path) -> SilentCipherConfig:
    """Parse and validate ``directory/hparams.yaml``.

    PyYAML's ``safe_load`` (PyYAML comes with huggingface-hub): the published file is a plain YAML
    mapping written by the training code, not necessarily in the one-``key: value``-per-line form.
    """
    import yaml

    path = directory / HPARAMS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelSourceError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from exc
    try:
        hparams = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(hparams, dict):
        raise CheckpointError(f"{path} is not a YAML mapping of hyper-parameters")
    return config_from_hparams(hparams, path)


def _is_optional(key: str) -> bool:
    # BatchNorm's batch counter: never read (not even by the package's forward), and torch itself
    # accepts its absence in old checkpoints.
    return key.endswith(".num_batches_tracked")


def load_state(module: nn.Module, path: Path, device: torch.device) -> None:
    """Fill ``module`` from the state dict in ``path``, checking every key and shape first.

    ``weights_only=True``: a checkpoint is data, never code to run.  A ``module.`` prefix (what
    ``nn.DataParallel`` saves) is removed as the package does.
    """
    try:
        loaded = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise ModelSourceError(f"{path} does not exist") from None
    except Exception as exc:  # pickle, zip and torch errors alike: the file is not a usable state dict
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    state = {(k.removeprefix("module.") if isinstance(k, str) else k): v for k, v in loaded.items()}
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not _is_optional(k)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"missing key {k}" for k in missing] + [f"unexpected key {k}" for k in unexpected]
        raise CheckpointError(f"{path} does not match the network: {', '.join(parts[:8])}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, the hparams give {tuple(expected[key].shape)}"
            )
    module.load_state_dict(state, strict=False)

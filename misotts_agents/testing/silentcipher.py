"""A SilentCipher 44.1 kHz checkpoint directory with random weights, made offline (`make-tiny`).

With it the whole watermark path runs without the real weights (``sony/silentcipher`` on the
Hugging Face Hub): everything except the *values* of the weights is exercised: the hyper-parameters,
the file names, the tensor shapes and therefore the compute cost and the length handling.  The
hyper-parameters below are the ones of the real ``44_1_khz/73999_iteration/hparams.yaml`` (see
``shared/notes/engine.md`` section 2), restricted to the keys silentcipher 1.0.5 reads.  The files are
in the official format: silentcipher's own ``get_model`` loads them (tests/test_silentcipher_parity.py
checks that), and so does :meth:`misotts_agents.model.silentcipher.SilentCipher.load`.

With random weights the decoder will not recover any embedded message, so tests must not expect
detection to succeed; they can check shapes, lengths, error handling, that calls complete, and that
our port and the package compute the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from misotts_agents.model.silentcipher import CHECKPOINT_FILES, build_networks, config_from_hparams
from misotts_agents.model.silentcipher.networks import InputStatisticsNorm

# Keys read by silentcipher 1.0.5 (server.Model.__init__/encode_wav and model.CarrierDecoder).
SILENTCIPHER_44K_HPARAMS: dict[str, Any] = {
    "model_type": "44.1k",
    "SR": 44100,
    "N_FFT": 4096,
    "HOP_LENGTH": 2048,
    "message_band_size": 1024,
    "message_dim": 5,
    "message_len": 21,
    "message_sdr": 47,
    "n_messages": 1,
    "enc_n_layers": 3,
    "dec_c_n_layers": 4,
    "ensure_negative_message": True,
    "ensure_constrained_message": False,
    "frame_level_normalization": False,
    "utterance_level_normalization": True,
    "no_normalization": False,
}

__all__ = ["CHECKPOINT_FILES", "SILENTCIPHER_44K_HPARAMS", "make_tiny_silentcipher"]


def _write_hparams(path: Path, hparams: Mapping[str, Any]) -> None:
    # Written by hand (not yaml.dump) so the fixture does not depend on PyYAML's formatting choices;
    # the values are plain scalars, so "key: value" lines are valid YAML.
    lines = []
    for key, value in hparams.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = f"'{value}'"
        else:
            text = str(value)
        lines.append(f"{key}: {text}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _randomise_norms(module: torch.nn.Module) -> None:
    """Give every BatchNorm a random affine and random running statistics.

    Freshly built BatchNorms have weight 1, bias 0, mean 0, variance 1, which would hide a port that
    forgot the affine or used the running statistics (the package never uses them: it never calls
    ``.eval()``); random values make such a mistake change the output.
    """
    for norm in module.modules():
        if isinstance(norm, InputStatisticsNorm):
            with torch.no_grad():
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0.0, 0.2)
                for name, low, high in (("running_mean", -1.0, 1.0), ("running_var", 0.5, 2.0)):
                    buffer = getattr(norm, name)
                    buffer.uniform_(low, high)


def make_tiny_silentcipher(path: str | Path, seed: int = 0, *, overrides: Mapping[str, Any] | None = None) -> Path:
    """Create ``hparams.yaml``, ``enc_c.ckpt``, ``dec_c.ckpt`` and ``dec_m_0.ckpt`` under ``path``.

    The networks are ours (misotts_agents.model.silentcipher), whose state dicts have the package's
    keys and shapes.  ``overrides`` replaces hparams (tests use a narrower ``message_band_size`` to
    make the message decoder cheap).  The weights depend only on ``seed`` and the hparams; they are
    drawn inside ``torch.random.fork_rng``, so the caller's global RNG is left as it was.  Returns
    the directory.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    hparams = {**SILENTCIPHER_44K_HPARAMS, **(overrides or {})}
    config = config_from_hparams(hparams, out / "hparams.yaml")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        networks = build_networks(config)
        for network in networks:
            _randomise_norms(network)
    _write_hparams(out / "hparams.yaml", hparams)
    for name, network in zip(CHECKPOINT_FILES, networks, strict=True):
        torch.save(network.state_dict(), out / name)
    return out

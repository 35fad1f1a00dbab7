"""A SilentCipher 44.1 kHz checkpoint directory with random weights, made offline (`make-tiny`).

With it the whole watermark path runs without the real weights (``sony/silentcipher`` on the
Hugging Face Hub): everything except the *values* of the weights is exercised: the hyper-parameters,
the file names ``silentcipher.server.Model.load_models`` expects, the tensor shapes and therefore
the compute cost and the length handling.  The hyper-parameters below are the ones of the real
``44_1_khz/73999_iteration/hparams.yaml`` (see ``shared/notes/engine.md`` section 2), restricted to
the keys ``silentcipher.server.Model`` and ``silentcipher.model`` actually read.

With random weights the decoder will not recover any embedded message, so tests must not expect
detection to succeed; they can check shapes, lengths, error handling and that calls complete.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

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

CHECKPOINT_FILES = ("enc_c.ckpt", "dec_c.ckpt", "dec_m_0.ckpt")


def _write_hparams(path: Path) -> None:
    # Written by hand (not yaml.dump) so the fixture does not depend on PyYAML's formatting choices;
    # the values are plain scalars, so "key: value" lines are valid YAML.
    lines = []
    for key, value in SILENTCIPHER_44K_HPARAMS.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = f"'{value}'"
        else:
            text = str(value)
        lines.append(f"{key}: {text}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_tiny_silentcipher(path: str | Path, seed: int = 0) -> Path:
    """Create ``hparams.yaml``, ``enc_c.ckpt``, ``dec_c.ckpt`` and ``dec_m_0.ckpt`` under ``path``.

    The modules are built with silentcipher's own classes and the same constructor arguments
    ``silentcipher.server.Model`` uses, so ``load_state_dict`` accepts the files exactly as it would
    accept the published checkpoints.  The weights depend only on ``seed``; they are drawn inside
    ``torch.random.fork_rng``, so the caller's global RNG is left as it was.  Returns the directory.
    """
    import torch

    with warnings.catch_warnings():
        # Importing silentcipher.model runs silentcipher/__init__, which imports pydub; pydub warns
        # about a missing ffmpeg and (when compiling) about invalid escapes.  Neither matters here.
        warnings.simplefilter("ignore")
        from silentcipher.model import CarrierDecoder, Encoder, MsgDecoder

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    hp = SILENTCIPHER_44K_HPARAMS
    config = argparse.Namespace(**hp)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Same arguments as server.Model: encoder_out_dim=32, dec_c_conv_dim=32*3.
        enc_c = Encoder(
            n_layers=hp["enc_n_layers"],
            message_dim=hp["message_dim"],
            out_dim=32,
            message_band_size=hp["message_band_size"],
            n_fft=hp["N_FFT"],
        )
        dec_c = CarrierDecoder(
            config=config,
            conv_dim=32 * 3,
            n_layers=hp["dec_c_n_layers"],
            message_band_size=hp["message_band_size"],
        )
        dec_m = MsgDecoder(message_dim=hp["message_dim"], message_band_size=hp["message_band_size"])

    _write_hparams(out / "hparams.yaml")
    torch.save(enc_c.state_dict(), out / "enc_c.ckpt")
    torch.save(dec_c.state_dict(), out / "dec_c.ckpt")
    torch.save(dec_m.state_dict(), out / "dec_m_0.ckpt")
    return out

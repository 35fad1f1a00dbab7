"""A tiny random-weight Mimi with the real interface, and saving any Mimi so ``load_mimi`` rebuilds it.

Test fixtures (and ``make-tiny``): the real codec is loaded by :mod:`misotts_agents.model.codec`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.quantization.core_vq import EuclideanCodebook

from misotts_agents.model.codec import (
    _CONFIG_ATTR,
    CONFIG_FILENAME,
    NUM_CODEBOOKS,
    WEIGHTS_FILENAME,
    _default_mimi_config,
    mimi_config_of,
)


def tiny_mimi_config() -> dict[str, Any]:
    """A much smaller Mimi with the exact same interface as the real one.

    Kept identical to the real model: 24 kHz mono, SEANet hop of 960 (ratios 8,6,5,4) followed by the
    learnt x2 conv down/up-sampler (so 12.5 Hz, 1920-sample frames), a streaming RoPE transformer with
    the same 250-step context, and a split RVQ with 32 codebooks x 2048 bins. So every tensor the rest
    of the package sees (codes (B, 32, T), PCM (B, 1, 1920*T)) has the real shapes, and every streaming
    code path (conv state, transposed-conv partials, ring KV cache, exec masks) is exercised.
    Shrunk: SEANet filters 64 -> 4 and latent 512 -> 32, one transformer layer of width 32 instead of
    eight of 512, codebook vectors 256 -> 8 dims. About 0.13 M parameters (real: 79.3 M); a streaming
    one-frame decode is dominated by per-module Python overhead (a few ms on 2 CPU cores).
    """
    cfg = _default_mimi_config()
    latent = 32
    cfg["seanet"].update(n_filters=4, dimension=latent)
    cfg["transformer"].update(
        d_model=latent,
        num_heads=2,
        num_layers=1,
        dim_feedforward=64,
        input_dimension=latent,
        output_dimensions=[latent],
    )
    cfg["quantizer"].update(dimension=8, input_dimension=latent, output_dimension=latent)
    return cfg


def _randomize_codebooks(mimi: MimiModel, generator: torch.Generator) -> None:
    """Give a randomly initialised Mimi usable codebooks.

    moshi's ``EuclideanCodebook`` starts with ``embedding_sum`` all zeros (k-means fills it during
    training), so a random-init Mimi encodes everything to code 0 and decodes every code to the same
    vector: useless for tests. Fill the sums with N(0, 1) (``cluster_usage`` stays 1, so the centroids
    equal the sums), mark them initialised and drop the cached ``_embedding`` so it is recomputed.
    """
    with torch.no_grad():
        for module in mimi.modules():
            if isinstance(module, EuclideanCodebook):
                module.embedding_sum.normal_(generator=generator)
                module._initialized.fill_(1.0)
                module.register_buffer("_embedding", None, persistent=False)  # as moshi clears it


def build_tiny_mimi(seed: int = 0) -> MimiModel:
    """A random-weight Mimi with :func:`tiny_mimi_config`, on CPU in eval mode, 32 codebooks.

    Deterministic for a given ``seed`` without disturbing the caller's global RNG (weights are drawn
    inside ``torch.random.fork_rng``), so tests and ``make-tiny`` produce the same model every time.
    """
    cfg = tiny_mimi_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mimi = loaders.get_mimi(None, mimi_config=cfg, device="cpu", num_codebooks=NUM_CODEBOOKS)
        generator = torch.Generator().manual_seed(seed + 1)
        _randomize_codebooks(mimi, generator)
    mimi.eval()
    setattr(mimi, _CONFIG_ATTR, cfg)
    return mimi


def save_mimi(mimi: MimiModel, directory: Path | str, config: dict[str, Any] | None = None) -> Path:
    """Write ``mimi.safetensors`` + ``mimi_config.json`` so ``load_mimi(directory)`` rebuilds it exactly.

    The full state dict is saved, including the codebook buffers (``embedding_sum``, ``cluster_usage``,
    ``_initialized``) that the decoder depends on. ``config`` defaults to the one the model was built or
    loaded with. Returns the directory.
    """
    from safetensors.torch import save_file

    cfg = config if config is not None else mimi_config_of(mimi)
    if cfg is None:
        raise ValueError("this MimiModel's config is unknown; pass config= explicitly")
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to("cpu").contiguous() for name, t in mimi.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILENAME))
    (directory / CONFIG_FILENAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return directory

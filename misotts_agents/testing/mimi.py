"""A tiny random-weight Mimi with the real interface, and random full-size ones (test fixtures, make-tiny).

The real codec is loaded by :mod:`misotts_agents.model.codec`; these build :class:`MimiModel` s whose
weights are random, with codebooks that decode distinct codes to distinct vectors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from misotts_agents.model.codec import NUM_CODEBOOKS
from misotts_agents.model.mimi import MimiModel, default_config


def tiny_mimi_config() -> dict[str, Any]:
    """A much smaller Mimi with the exact same interface as the real one.

    Kept identical to the real model: 24 kHz mono, SEANet hop of 960 (ratios 8,6,5,4) followed by the
    learnt x2 conv down/up-sampler (so 12.5 Hz, 1920-sample frames), a streaming RoPE transformer with
    the same 250-step context, and a split RVQ with 32 codebooks x 2048 bins. So every tensor the rest
    of the package sees (codes (B, 32, T), PCM (B, 1, 1920*T)) has the real shapes, and every streaming
    code path (conv state, transposed-conv partials, ring KV cache, row masks) is exercised.
    Shrunk: SEANet filters 64 -> 4 and latent 512 -> 32, one transformer layer of width 32 instead of
    eight of 512, codebook vectors 256 -> 8 dims. About 0.13 M parameters (real: 79.3 M).
    """
    cfg = default_config()
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


@torch.no_grad()
def fill_codebooks(mimi: nn.Module, generator: torch.Generator) -> None:
    """Give a randomly initialised Mimi usable codebooks (ours, or moshi's in the parity tests).

    A codebook is ``embedding_sum / cluster_usage``, and a fresh one has ``embedding_sum`` all zeros
    (k-means fills it during training), so a random-init Mimi encodes everything to code 0 and decodes
    every code to the same vector: useless for tests. Fill the sums with N(0, 1) (``cluster_usage``
    stays 1, so the centroids equal the sums) and mark them initialised; moshi's cached centroids
    (``_embedding``, not saved) are dropped so it recomputes them.
    """
    for module in mimi.modules():
        buffers = dict(module.named_buffers(recurse=False))
        if "embedding_sum" not in buffers:
            continue
        buffers["embedding_sum"].normal_(generator=generator)
        if "_initialized" in buffers:
            buffers["_initialized"].fill_(1.0)
        if "_embedding" in buffers:
            module.register_buffer("_embedding", None, persistent=False)


def random_mimi_model(config: dict[str, Any], device: torch.device | str = "cpu", seed: int = 0) -> MimiModel:
    """A random-weight Mimi built from ``config`` on ``device`` in eval mode, 32 codebooks, filled codebooks.

    Deterministic for a given ``seed`` without disturbing the caller's global RNG (weights are drawn
    inside ``torch.random.fork_rng``), so tests and ``make-tiny`` produce the same model every time.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            mimi = MimiModel(config, num_codebooks=NUM_CODEBOOKS)
        fill_codebooks(mimi, torch.Generator(device=device).manual_seed(seed + 1))
    return mimi.eval().requires_grad_(False)


def build_tiny_mimi(seed: int = 0) -> MimiModel:
    """A random-weight Mimi with :func:`tiny_mimi_config` on CPU (see :func:`random_mimi_model`)."""
    return random_mimi_model(tiny_mimi_config(), "cpu", seed)

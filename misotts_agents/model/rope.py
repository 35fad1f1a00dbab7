"""Llama-3 scaled rotary position embeddings (torchtune's Llama3ScaledRoPE), interleaved pairs."""

from __future__ import annotations

import torch

from misotts_agents.model.config import (
    ROPE_BASE,
    ROPE_HIGH_FREQ_FACTOR,
    ROPE_LOW_FREQ_FACTOR,
    ROPE_OLD_CONTEXT_LEN,
    ROPE_SCALE_FACTOR,
)


def llama3_rope_cache(head_dim: int, max_seq_len: int, device: torch.device) -> torch.Tensor:
    """(max_seq_len, head_dim/2, 2) cos/sin table with Llama-3 frequency scaling, in fp32."""
    steps = torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float()
    freqs = 1.0 / (ROPE_BASE ** (steps / head_dim))
    wavelen = 2 * torch.pi / freqs
    low_wavelen = ROPE_OLD_CONTEXT_LEN / ROPE_LOW_FREQ_FACTOR
    high_wavelen = ROPE_OLD_CONTEXT_LEN / ROPE_HIGH_FREQ_FACTOR
    smooth = (ROPE_OLD_CONTEXT_LEN / wavelen - ROPE_LOW_FREQ_FACTOR) / (ROPE_HIGH_FREQ_FACTOR - ROPE_LOW_FREQ_FACTOR)
    blended = (1 - smooth) * freqs / ROPE_SCALE_FACTOR + smooth * freqs
    theta = torch.where(
        wavelen < high_wavelen, freqs, torch.where(wavelen > low_wavelen, freqs / ROPE_SCALE_FACTOR, blended)
    )
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), theta)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (b, s, heads, head_dim) by ``rotation`` (b, s, 1, head_dim/2, 2)
    = (cos, sin), in fp32: (x0 cos - x1 sin, x1 cos + x0 sin), the reference's arithmetic.

    Eagerly it is one complex product (one kernel instead of seven; the same roundings). Inductor
    generates no code for complex operators, so under ``torch.compile`` the real form is traced
    and fused instead.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        x0, x1, cos, sin = pairs[..., 0], pairs[..., 1], rotation[..., 0], rotation[..., 1]
        out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1)
    else:
        out = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rotation))
    return out.flatten(-2).type_as(x)

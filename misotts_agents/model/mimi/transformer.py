"""Mimi's latent transformer: pre-norm layers, causal attention limited to ``context`` steps, RoPE.

Whole clip (:meth:`ProjectedTransformer.forward`): step ``t`` attends to steps ``t - context + 1 .. t``.
That window applies to whole clips too, as moshi applies it, so a clip longer than ``context`` steps
is not fully connected.

Streaming (:meth:`ProjectedTransformer.step`): each row keeps a ring KV cache of ``context`` slots and
its own position. A chunk of T steps is written at slots ``(position + t) % context`` *before* the
attention reads the cache, so once the ring has wrapped the earliest query of a chunk has lost the
oldest keys the new ones overwrote: with T = 2 (Mimi's decoder) it sees 249 past keys, not 250. That
is moshi's streaming behaviour and it is reproduced; streamed output differs from the whole clip
there. Rows whose ``active`` flag is off keep their cache and position unchanged.

Parameter names follow moshi (``self_attn.in_projs.0.weight``, ...); the released checkpoint's older
names (``self_attn.in_proj_weight``, ``self_attn.out_proj.weight``) are accepted when loading.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from misotts_agents.model.mimi.config import TransformerSettings

__all__ = ["ProjectedTransformer", "Rotary", "rename_attention_keys"]

_EachLayer = Callable[["TransformerLayer", int, torch.Tensor], torch.Tensor]

# The released checkpoint's names -> moshi's current ones (moshi renames them in a load hook too).
_ATTENTION_ALIASES = {
    "in_proj_weight": "in_projs.0.weight",
    "in_proj.weight": "in_projs.0.weight",
    "out_proj.weight": "out_projs.0.weight",
}


def rename_attention_keys(state: dict[str, Any], prefix: str = "") -> None:
    """Rename older attention keys under ``prefix`` in ``state`` (in place) to the current names."""
    for old, new in _ATTENTION_ALIASES.items():
        if prefix + old in state and prefix + new not in state:
            state[prefix + new] = state.pop(prefix + old)


class Rotary(NamedTuple):
    """cos and sin of the rotation angles, (B, 1, T, head_dim / 2), shared by every layer."""

    cos: torch.Tensor
    sin: torch.Tensor

    @staticmethod
    def at(positions: torch.Tensor, head_dim: int, max_period: float) -> Rotary:
        """Angles for (B, T) integer positions, computed in float32 as moshi does (same formula, same order)."""
        half = torch.arange(head_dim // 2, device=positions.device, dtype=torch.float32)
        freqs = torch.exp(half * (-math.log(max_period) * 2 / head_dim))
        angles = freqs * positions.float()[:, None, :, None]
        return Rotary(torch.cos(angles), torch.sin(angles))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate (B, H, T, D) queries or keys; pairs are interleaved: (x0, x1), (x2, x3), ..."""
        pairs = x.view(*x.shape[:-1], x.shape[-1] // 2, 2)
        real, imag = pairs[..., 0].float(), pairs[..., 1].float()
        out_real = real * self.cos - imag * self.sin
        out_imag = real * self.sin + imag * self.cos
        return torch.stack([out_real.to(x.dtype), out_imag.to(x.dtype)], dim=-1).view(x.shape)


class LayerScale(nn.Module):
    """A learnt per-channel factor on a residual update."""

    def __init__(self, channels: int, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class SelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection and no biases.

    The projections sit in one-element lists (``in_projs.0``, ``out_projs.0``) only to match moshi's
    names (moshi can keep one projection per step there; Mimi never does).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        # Registered in moshi's order so state_dict() lists the keys in the same order.
        self.out_projs = nn.ModuleList([nn.Linear(dim, dim, bias=False)])
        self.in_projs = nn.ModuleList([nn.Linear(dim, 3 * dim, bias=False)])
        self.register_load_state_dict_pre_hook(self._rename_old_keys)

    @staticmethod
    def _rename_old_keys(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        rename_attention_keys(state, prefix)

    def _qkv(self, x: torch.Tensor, rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        qkv = self.in_projs[0](x).view(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return rotary.apply(qkv[0]), rotary.apply(qkv[1]), qkv[2]

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        b, h, t, d = y.shape
        return self.out_projs[0](y.transpose(1, 2).reshape(b, t, h * d))

    def forward(self, x: torch.Tensor, rotary: Rotary, mask: torch.Tensor) -> torch.Tensor:
        """Whole clip: (B, T, C) -> (B, T, C); ``mask`` (B, 1, T, T) says which key each query may see."""
        q, k, v = self._qkv(x, rotary)
        return self._out(F.scaled_dot_product_attention(q, k, v, mask))

    def step(
        self,
        x: torch.Tensor,
        rotary: Rotary,
        mask: torch.Tensor,
        cache: torch.Tensor,
        slots: torch.Tensor,
        active: torch.Tensor,
    ) -> torch.Tensor:
        """Streaming: write this chunk's keys/values into ``cache`` (2, B, H, context, D) at ``slots``
        (indices already expanded to (2, B, H, T, D)), then attend over the whole ring with ``mask``
        (B, 1, T, context). Inactive rows write back what their slots held, so their cache is unchanged."""
        q, k, v = self._qkv(x, rotary)
        written = torch.where(active.view(1, -1, 1, 1, 1), torch.stack([k, v]), cache.gather(3, slots))
        cache.scatter_(3, slots, written)
        return self._out(F.scaled_dot_product_attention(q, cache[0], cache[1], mask))


class TransformerLayer(nn.Module):
    """x += ls1 * attn(norm1(x)); x += ls2 * linear2(gelu(linear1(norm2(x))))."""

    def __init__(self, settings: TransformerSettings) -> None:
        super().__init__()
        dim = settings.d_model
        self.self_attn = SelfAttention(dim, settings.num_heads)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.linear1 = nn.Linear(dim, settings.dim_feedforward, bias=False)
        self.linear2 = nn.Linear(settings.dim_feedforward, dim, bias=False)
        scale = settings.layer_scale
        self.layer_scale_1: nn.Module = nn.Identity() if scale is None else LayerScale(dim, scale)
        self.layer_scale_2: nn.Module = nn.Identity() if scale is None else LayerScale(dim, scale)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale_2(self.linear2(F.gelu(self.linear1(self.norm2(x)))))

    def forward(self, x: torch.Tensor, rotary: Rotary, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), rotary, mask))
        return self._feed_forward(x)

    def step(
        self,
        x: torch.Tensor,
        rotary: Rotary,
        mask: torch.Tensor,
        cache: torch.Tensor,
        slots: torch.Tensor,
        active: torch.Tensor,
    ) -> torch.Tensor:
        x = x + self.layer_scale_1(self.self_attn.step(self.norm1(x), rotary, mask, cache, slots, active))
        return self._feed_forward(x)


class _Layers(nn.Module):
    """The layer stack, one level down (``transformer.layers.N``) as in moshi's names."""

    def __init__(self, settings: TransformerSettings) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TransformerLayer(settings) for _ in range(settings.num_layers)])


class ProjectedTransformer(nn.Module):
    """The transformer on a (B, C, T) latent; (B, C, T) out. C equals d_model for Mimi (no projections)."""

    def __init__(self, settings: TransformerSettings) -> None:
        super().__init__()
        self.settings = settings
        self.head_dim = settings.d_model // settings.num_heads
        self.transformer = _Layers(settings)
        self.input_proj: nn.Module | None = None
        if settings.input_dimension != settings.d_model:
            self.input_proj = nn.Linear(settings.input_dimension, settings.d_model, bias=False)
        out: nn.Module = nn.Identity()
        if settings.output_dimension != settings.d_model:
            out = nn.Linear(settings.d_model, settings.output_dimension, bias=False)
        self.output_projs = nn.ModuleList([out])

    @property
    def layers(self) -> list[TransformerLayer]:
        return [layer for layer in self.transformer.layers if isinstance(layer, TransformerLayer)]

    def _run(self, x: torch.Tensor, each_layer: _EachLayer) -> torch.Tensor:
        """Projections and layout around the layers; ``each_layer(layer, index, h)`` runs one layer."""
        x = x.transpose(1, 2)
        if self.input_proj is not None:
            x = self.input_proj(x)
        for index, layer in enumerate(self.layers):
            x = each_layer(layer, index, x)
        return self.output_projs[0](x).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole clip, (B, C, T) -> (B, C, T)."""
        b, _, t = x.shape
        steps = torch.arange(t, device=x.device)
        rotary = Rotary.at(steps.expand(b, t), self.head_dim, self.settings.max_period)
        delta = steps[:, None] - steps[None, :]  # query step - key step
        mask = ((delta >= 0) & (delta < self.settings.context)).expand(b, 1, t, t)
        return self._run(x, lambda layer, _, h: layer(h, rotary, mask))

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh stream's ring caches (layers, 2, B, H, context, D) and positions (B,) int64."""
        s = self.settings
        shape = (s.num_layers, 2, batch_size, s.num_heads, s.context, self.head_dim)
        cache = torch.zeros(shape, device=device, dtype=dtype)
        return cache, torch.zeros(batch_size, device=device, dtype=torch.long)

    def step(self, x: torch.Tensor, cache: torch.Tensor, positions: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The next chunk of each row, (B, C, T) -> (B, C, T); ``cache`` and ``positions`` (from
        :meth:`new_state`) are updated in place for the active rows."""
        b, _, t = x.shape
        s = self.settings
        ring = s.context
        steps = torch.arange(t, device=x.device)
        query_pos = positions[:, None] + steps  # (B, T)
        rotary = Rotary.at(query_pos, self.head_dim, s.max_period)
        # What each ring slot holds after this chunk's write: the latest position p <= last with
        # p % ring == slot; never written yet (p < 0) means empty. Same positions as moshi's RingKVCache.
        last = positions[:, None] + (t - 1)
        key_pos = last - torch.remainder(last - torch.arange(ring, device=x.device), ring)  # (B, ring)
        delta = query_pos[:, :, None] - key_pos[:, None, :]  # (B, T, ring)
        mask = ((key_pos[:, None, :] >= 0) & (delta >= 0) & (delta < ring))[:, None]
        slots = torch.remainder(query_pos, ring)[None, :, None, :, None]
        slots = slots.expand(2, b, s.num_heads, t, self.head_dim)
        out = self._run(x, lambda layer, i, h: layer.step(h, rotary, mask, cache[i], slots, active))
        positions.add_(active.long() * t)
        return out

"""The MisoTTS / CSM model in plain PyTorch: a Llama-3.2-style backbone and depth decoder.

Parameter names follow the official checkpoint (torchtune layout) so `model.safetensors` loads
strictly. The math reproduces torchtune 0.6.1 exactly (interleaved-pair Llama-3 scaled RoPE, fp32
RMSNorm, GQA, SwiGLU, attention over the whole static KV cache under a boolean mask).

The KV caches are preallocated for ``max_batch`` rows; every call names the cache rows it uses, so a
scheduler can keep many conversations in one cache and run them in one batched step. Cache writes
land at the given positions with indexed assignment (no host synchronisation, graph-capturable).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from misotts_agents.model.config import (
    MAX_SEQ_LEN,
    NORM_EPS,
    ROPE_BASE,
    ROPE_HIGH_FREQ_FACTOR,
    ROPE_LOW_FREQ_FACTOR,
    ROPE_OLD_CONTEXT_LEN,
    ROPE_SCALE_FACTOR,
    Flavor,
    ModelConfig,
)
from misotts_agents.model.sampling import SamplingState, sample_topk


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the weight dtype, as the reference does.
        return F.rms_norm(x.float(), (x.shape[-1],), self.scale, NORM_EPS).to(x.dtype)


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


def apply_rope(x: torch.Tensor, rope: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (b, s, heads, head_dim) by the angles at input_pos (b, s)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    cache = rope[input_pos].view(-1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [
            xs[..., 0] * cache[..., 0] - xs[..., 1] * cache[..., 1],
            xs[..., 1] * cache[..., 0] + xs[..., 0] * cache[..., 1],
        ],
        -1,
    )
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, flavor: Flavor) -> None:
        super().__init__()
        self.num_heads = flavor.num_heads
        self.num_kv_heads = flavor.num_kv_heads
        self.head_dim = flavor.head_dim
        dim = flavor.embed_dim
        self.q_proj = nn.Linear(dim, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.output_proj = nn.Linear(self.num_heads * self.head_dim, dim, bias=False)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def setup_cache(self, max_batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (max_batch, self.num_kv_heads, max_len, self.head_dim)
        # Zeros, not empty: masked-out positions still enter q.k, and NaN garbage would survive the mask.
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        input_pos: torch.Tensor,
        mask: torch.Tensor,
        rows: torch.Tensor | None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = apply_rope(self.q_proj(x).view(b, s, self.num_heads, self.head_dim), rope, input_pos)
        k = apply_rope(self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim), rope, input_pos)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("KV cache not set up: call setup_caches() first")
        if rows is None:
            row_idx = torch.arange(b, device=x.device)[:, None]
            k_all, v_all = self.k_cache[:b], self.v_cache[:b]
        else:
            row_idx = rows[:, None]
        self.k_cache[row_idx, :, input_pos] = k
        self.v_cache[row_idx, :, input_pos] = v
        if rows is not None:
            k_all, v_all = self.k_cache[rows], self.v_cache[rows]
        q = q.transpose(1, 2)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            expand = (b, self.num_kv_heads, groups, -1, self.head_dim)
            k_all = k_all.unsqueeze(2).expand(expand).flatten(1, 2)
            v_all = v_all.unsqueeze(2).expand(expand).flatten(1, 2)
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask[:, None, :, :])
        return self.output_proj(out.transpose(1, 2).contiguous().view(b, s, -1))


class MLP(nn.Module):
    def __init__(self, flavor: Flavor) -> None:
        super().__init__()
        self.w1 = nn.Linear(flavor.embed_dim, flavor.intermediate_dim, bias=False)
        self.w2 = nn.Linear(flavor.intermediate_dim, flavor.embed_dim, bias=False)
        self.w3 = nn.Linear(flavor.embed_dim, flavor.intermediate_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Layer(nn.Module):
    def __init__(self, flavor: Flavor) -> None:
        super().__init__()
        self.sa_norm = RMSNorm(flavor.embed_dim)
        self.attn = Attention(flavor)
        self.mlp_norm = RMSNorm(flavor.embed_dim)
        self.mlp = MLP(flavor)

    def forward(self, x, rope, input_pos, mask, rows):
        h = self.attn(self.sa_norm(x), rope, input_pos, mask, rows) + x
        return self.mlp(self.mlp_norm(h)) + h


class Transformer(nn.Module):
    """A stack of layers over a static KV cache of ``max_len`` positions (no embeddings, no output head)."""

    def __init__(self, flavor: Flavor, max_len: int) -> None:
        super().__init__()
        self.flavor = flavor
        self.max_len = max_len
        self.layers = nn.ModuleList(Layer(flavor) for _ in range(flavor.num_layers))
        self.norm = RMSNorm(flavor.embed_dim)
        self.init_buffers(self.norm.scale.device, self.norm.scale.dtype)

    def init_buffers(self, device: torch.device, dtype: torch.dtype) -> None:
        """(Re)build the derived tables; needed after loading weights into a model made on ``meta``.

        The RoPE table is computed in fp32 and stored in the weights' dtype: the reference casts the
        whole model (this table included) to bf16, and bit-parity needs the same rounded angles.
        """
        rope = llama3_rope_cache(self.flavor.head_dim, self.max_len, device).to(dtype)
        self.register_buffer("rope", rope, persistent=False)
        mask = torch.ones(self.max_len, self.max_len, dtype=torch.bool, device=device).tril()
        self.register_buffer("causal_mask", mask, persistent=False)

    def setup_caches(self, max_batch: int, dtype: torch.dtype, device: torch.device) -> None:
        for layer in self.layers:
            layer.attn.setup_cache(max_batch, self.max_len, dtype, device)

    def export_prefix(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of the first ``length`` cached positions of one row, per layer (for prefix reuse)."""
        return [
            (layer.attn.k_cache[row, :, :length].clone(), layer.attn.v_cache[row, :, :length].clone())
            for layer in self.layers
        ]

    def import_prefix(self, row: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write an exported prefix into another row's first positions."""
        for layer, (k, v) in zip(self.layers, kv, strict=True):
            layer.attn.k_cache[row, :, : k.size(1)] = k
            layer.attn.v_cache[row, :, : v.size(1)] = v

    def forward(self, h: torch.Tensor, input_pos: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """h (b, s, dim) at positions input_pos (b, s) -> normalised hidden states in fp32."""
        mask = self.causal_mask[input_pos]
        for layer in self.layers:
            h = layer(h, self.rope, input_pos, mask, rows)
        return self.norm(h).float()


class MisoModel(nn.Module):
    """Backbone + depth decoder + embeddings and heads, named as in the official checkpoint."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        backbone, decoder = config.backbone, config.decoder
        self.num_codebooks = config.audio_num_codebooks
        self.audio_vocab_size = config.audio_vocab_size
        self.backbone = Transformer(backbone, MAX_SEQ_LEN)
        self.decoder = Transformer(decoder, config.audio_num_codebooks)
        self.text_embeddings = nn.Embedding(config.text_vocab_size, backbone.embed_dim)
        self.audio_embeddings = nn.Embedding(config.audio_vocab_size * config.audio_num_codebooks, backbone.embed_dim)
        self.projection = nn.Linear(backbone.embed_dim, decoder.embed_dim, bias=False)
        self.codebook0_head = nn.Linear(backbone.embed_dim, config.audio_vocab_size, bias=False)
        self.audio_head = nn.Parameter(
            torch.empty(config.audio_num_codebooks - 1, decoder.embed_dim, config.audio_vocab_size)
        )
        self.max_batch = 0
        self.init_buffers()

    def init_buffers(self) -> None:
        """Build the non-persistent tables on the weights' device (after a ``meta`` construction + load)."""
        device = self.device
        offsets = torch.arange(self.num_codebooks, device=device) * self.audio_vocab_size
        self.register_buffer("codebook_offsets", offsets, persistent=False)
        self.backbone.init_buffers(device, self.dtype)
        self.decoder.init_buffers(device, self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_embeddings.weight.device

    def setup_caches(self, max_batch: int) -> None:
        """Allocate KV caches for ``max_batch`` concurrent sequences (cache rows)."""
        self.backbone.setup_caches(max_batch, self.dtype, self.device)
        self.decoder.setup_caches(max_batch, self.dtype, self.device)
        self.max_batch = max_batch

    def embed_frames(self, tokens: torch.Tensor, tokens_mask: torch.Tensor) -> torch.Tensor:
        """(b, s, K+1) frame tokens and masks -> (b, s, dim): masked sum of audio and text embeddings."""
        b, s, _ = tokens.shape
        text = self.text_embeddings(tokens[:, :, -1]).unsqueeze(-2)
        audio_ids = tokens[:, :, :-1] + self.codebook_offsets
        audio = self.audio_embeddings(audio_ids.reshape(-1)).reshape(b, s, self.num_codebooks, -1)
        embeds = torch.cat([audio, text], dim=-2)
        return (embeds * tokens_mask.unsqueeze(-1)).sum(dim=2)

    def backbone_last_hidden(
        self,
        tokens: torch.Tensor,
        tokens_mask: torch.Tensor,
        input_pos: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run frames through the backbone (filling the cache rows) and return the last hidden state (b, dim)."""
        h = self.backbone(self.embed_frames(tokens, tokens_mask), input_pos, rows).to(self.dtype)
        return h[:, -1, :]

    def _embed_audio(self, codebook: int, codes: torch.Tensor) -> torch.Tensor:
        return self.audio_embeddings(codes + codebook * self.audio_vocab_size)

    def decode_frame(self, last_h: torch.Tensor, sampling: SamplingState) -> torch.Tensor:
        """Sample one frame of K codes (b, K) from the backbone's last hidden state.

        Codebook 0 comes from the backbone head; codebooks 1..K-1 from the depth decoder, which
        restarts every frame from ``[h, E0(c0)]`` and uses cache rows 0..b-1.
        """
        b = last_h.size(0)
        noise = sampling.frame_noise(self.num_codebooks, self.audio_vocab_size)
        c0 = sample_topk(self.codebook0_head(last_h), sampling, 0, noise[:, 0])
        curr_h = torch.cat([last_h.unsqueeze(1), self._embed_audio(0, c0)], dim=1)
        pos = torch.arange(2, device=last_h.device).unsqueeze(0).expand(b, 2)
        codes = [c0]
        for i in range(1, self.num_codebooks):
            dh = self.decoder(self.projection(curr_h), pos).to(self.dtype)
            ci = sample_topk(torch.mm(dh[:, -1, :], self.audio_head[i - 1]), sampling, i, noise[:, i])
            codes.append(ci)
            curr_h = self._embed_audio(i, ci)
            pos = pos[:, -1:] + 1
        return torch.cat(codes, dim=1)

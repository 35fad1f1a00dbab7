"""The MisoTTS / CSM model in plain PyTorch: a Llama-3.2-style backbone and depth decoder.

Parameter names follow the official checkpoint (torchtune layout) so `model.safetensors` loads
strictly. The math is torchtune 0.6.1's (interleaved-pair Llama-3 scaled RoPE, fp32 RMSNorm, GQA,
SwiGLU); the greedy codes equal the reference's (tests/test_model_parity.py).

What makes it fast, and why each piece is shaped the way it is:

- **Fused projections** (fused.py). q/k/v and w1/w3 are each one matrix product. The official tensors stay
  under their own names as row views of the fused matrix (one copy in memory, strict loading and
  ``state_dict()`` unchanged); :meth:`MisoModel.fuse_weights` rebuilds what a load or conversion
  separated (in-place loads write through the views).
- **RMSNorm on its fused path**: fp32 input with an fp32 copy of the scale (a bf16 scale makes
  ``F.rms_norm`` fall back to six separate ops).
- **RoPE once per forward**: the rotations for the batch's positions are gathered once and shared
  by every layer; q and k are rotated together (one complex product when eager).
- **Attention proportional to what is used.** The KV caches are preallocated for ``max_batch``
  rows. A :class:`CacheWindow` says "batch row i *is* cache row i" and reads only positions
  ``[0, length)`` of the first ``attend`` rows: slices of the cache, no copies. Grouped KV heads are
  handled natively: the query heads sharing a KV head are laid out as that head's query rows
  (``q`` reshaped to (b, kv_heads, group x s, head_dim)), so K and V are never expanded. A tensor
  of row indices instead gathers those rows' used positions (prefill of arbitrary rows).
- The depth decoder reads exactly the positions each of its 31 steps has written (static lengths,
  no mask at all for its one-position steps).

Cache writes land at the given positions with indexed assignment (no host synchronisation,
graph-capturable). A row's positions at or beyond the next one it will write are free scratch:
they are always written before they are read (the frame step parks padding rows at the last one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from misotts_agents.model.config import MAX_SEQ_LEN, Flavor, ModelConfig, WeightFormat
from misotts_agents.model.fused import FusesWeights, RMSNorm, fuse_group, refresh_after_load
from misotts_agents.model.quantized import linear, make_linear
from misotts_agents.model.rope import apply_rope, llama3_rope_cache
from misotts_agents.model.sampling import SamplingState, sample_topk

# Backbone attention windows are multiples of this many positions (see length_buckets).
WINDOW_QUANTUM = 128


def length_buckets(max_len: int, quantum: int = WINDOW_QUANTUM) -> list[int]:
    """Attention window lengths a step may use: doubling up to 512 positions, then every 256.

    Few enough to capture a CUDA graph for each; fine enough that a step reads at most twice the
    positions in use (and at most 255 more beyond 512).
    """
    if max_len <= quantum:
        return [max_len]
    sizes, n = [], quantum
    while n < min(512, max_len):
        sizes.append(n)
        n *= 2
    n = min(n, max_len)
    while n < max_len:
        sizes.append(n)
        n += 256
    return [*sizes, max_len]


def length_bucket(positions: int, max_len: int) -> int:
    """The smallest window holding ``positions`` positions."""
    for size in length_buckets(max_len):
        if size >= positions:
            return size
    raise ValueError(f"{positions} positions exceed the cache's {max_len}")


@dataclass(frozen=True)
class CacheWindow:
    """Batch row i uses cache row i; attention reads positions ``[0, length)`` of the first
    ``attend`` rows (None: every row). Rows beyond ``attend`` are padding: they write their K/V
    (where their position says) but get no attention. ``masked=False`` states that every row
    attends to exactly all ``length`` positions (one query position, ``length - 1``), so no mask
    is built -- the depth decoder's steps."""

    length: int
    attend: int | None = None
    masked: bool = True


def _embedding(rows: int, dim: int) -> nn.Embedding:
    """An embedding table; on ``meta`` (to be loaded) without the random init, which there imports
    torch._dynamo (~160 MB of a loading process's peak memory)."""
    if torch.empty(0).is_meta:
        return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))
    return nn.Embedding(rows, dim)


class _Pass(NamedTuple):
    """What every layer of one forward shares: rotation, cache addressing, window and mask."""

    rotation: torch.Tensor  # (b, s, 1, head_dim/2, 2) fp32 (cos, sin): RoPE at each position
    input_pos: torch.Tensor  # (b, s)
    write_rows: torch.Tensor  # (b, 1) cache row of each batch row
    gather_rows: torch.Tensor | None  # (b,) rows to gather for reading, or None: rows [0, attend) in place
    attend: int  # batch rows that attend
    length: int  # positions read
    bias: torch.Tensor | None  # (attend, 1, s*group | 1, length) additive mask, or None


class Attention(nn.Module):
    k_cache: torch.Tensor | None  # (max_batch, kv heads, max_len, head_dim) once setup_cache ran
    v_cache: torch.Tensor | None
    wqkv: torch.Tensor  # fused by fuse_weights() in __init__
    wqkv_scale: torch.Tensor | None  # and the 8-bit layers' scales, fused the same way
    FUSED = ("wqkv", ("q_proj", "k_proj", "v_proj"))  # a fused matrix and the layers it stacks

    def __init__(self, flavor: Flavor, weights: WeightFormat = "bf16") -> None:
        super().__init__()
        self.num_heads = flavor.num_heads
        self.num_kv_heads = flavor.num_kv_heads
        self.head_dim = flavor.head_dim
        self.group = self.num_heads // self.num_kv_heads
        dim = flavor.embed_dim
        self.q_proj = make_linear(dim, self.num_heads * self.head_dim, weights)
        self.k_proj = make_linear(dim, self.num_kv_heads * self.head_dim, weights)
        self.v_proj = make_linear(dim, self.num_kv_heads * self.head_dim, weights)
        self.output_proj = make_linear(self.num_heads * self.head_dim, dim, weights)
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)
        self.register_buffer("wqkv", None, persistent=False)
        self.register_buffer("wqkv_scale", None, persistent=False)
        self.fuse_weights()
        self.register_load_state_dict_post_hook(refresh_after_load)

    def fuse_weights(self) -> None:
        fuse_group(self, *self.FUSED)

    def setup_cache(self, max_batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (max_batch, self.num_kv_heads, max_len, self.head_dim)
        # Zeros, not empty: stale positions are masked, and NaN garbage would survive a mask.
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("KV cache not set up: call setup_caches() first")
        return self.k_cache, self.v_cache

    def forward(self, x: torch.Tensor, p: _Pass) -> torch.Tensor:
        b, s, _ = x.shape
        heads, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("KV cache not set up: call setup_caches() first")
        qkv = linear(x, self.wqkv, self.wqkv_scale).view(b, s, heads + 2 * kv, hd)
        q, k = apply_rope(qkv[:, :, : heads + kv], p.rotation).split([heads, kv], dim=2)
        v = qkv[:, :, heads + kv :]
        self.k_cache[p.write_rows, :, p.input_pos] = k
        self.v_cache[p.write_rows, :, p.input_pos] = v
        n = p.attend
        if p.gather_rows is None:
            keys, values = self.k_cache[:n, :, : p.length], self.v_cache[:n, :, : p.length]
        else:
            keys, values = self.k_cache[p.gather_rows, :, : p.length], self.v_cache[p.gather_rows, :, : p.length]
        # The query heads of one KV head are that head's query rows: (n, kv, s * group, hd).
        q = q[:n].reshape(n, s, kv, self.group, hd).transpose(1, 2).reshape(n, kv, s * self.group, hd)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=p.bias)
        out = out.view(n, kv, s, self.group, hd).transpose(1, 2).reshape(n, s, heads * hd)
        if n < b:  # padding rows: no attention output
            out = F.pad(out, (0, 0, 0, 0, 0, b - n))
        return self.output_proj(out)


class MLP(nn.Module):
    w13: torch.Tensor  # fused by fuse_weights() in __init__
    w13_scale: torch.Tensor | None  # and the 8-bit layers' scales
    FUSED = ("w13", ("w1", "w3"))

    def __init__(self, flavor: Flavor, weights: WeightFormat = "bf16") -> None:
        super().__init__()
        self.w1 = make_linear(flavor.embed_dim, flavor.intermediate_dim, weights)
        self.w2 = make_linear(flavor.intermediate_dim, flavor.embed_dim, weights)
        self.w3 = make_linear(flavor.embed_dim, flavor.intermediate_dim, weights)
        self.register_buffer("w13", None, persistent=False)
        self.register_buffer("w13_scale", None, persistent=False)
        self.fuse_weights()
        self.register_load_state_dict_post_hook(refresh_after_load)

    def fuse_weights(self) -> None:
        fuse_group(self, *self.FUSED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.w13, self.w13_scale).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, flavor: Flavor, weights: WeightFormat = "bf16") -> None:
        super().__init__()
        self.sa_norm = RMSNorm(flavor.embed_dim)
        self.attn = Attention(flavor, weights)
        self.mlp_norm = RMSNorm(flavor.embed_dim)
        self.mlp = MLP(flavor, weights)

    def forward(self, x: torch.Tensor, p: _Pass) -> torch.Tensor:
        h = self.attn(self.sa_norm(x), p) + x
        return self.mlp(self.mlp_norm(h)) + h


class Transformer(nn.Module):
    """A stack of layers over a static KV cache of ``max_len`` positions (no embeddings, no output
    head); their linear layers in ``weights`` (quantized.py)."""

    rope: torch.Tensor  # buffers made by init_buffers()
    key_positions: torch.Tensor
    row_index: torch.Tensor

    def __init__(self, flavor: Flavor, max_len: int, weights: WeightFormat = "bf16") -> None:
        super().__init__()
        self.flavor = flavor
        self.max_len = max_len
        self.layers = nn.ModuleList(Layer(flavor, weights) for _ in range(flavor.num_layers))
        self.norm = RMSNorm(flavor.embed_dim)
        self.compiled_layers: list[Callable[..., torch.Tensor]] | None = None
        if not self.norm.scale.is_meta:  # (on meta, to be loaded: the loader builds them after)
            self.init_buffers(self.norm.scale.device, self.norm.scale.dtype)

    def compile_layers(self) -> None:
        """Run windowed calls (the frame step's) through ``torch.compile``d layers.

        One compiled graph per call pattern serves every layer of the stack (the weights are
        inputs, not constants), with symbolic batch and window sizes: a handful of compilations
        instead of one per layer and shape. Prefill (row tensors) stays eager: its large products
        gain little from fusion and its shapes vary with every prompt.
        """
        self.compiled_layers = [torch.compile(layer, dynamic=True) for layer in self.layers]

    def init_buffers(self, device: torch.device, dtype: torch.dtype) -> None:
        """(Re)build the derived tables; needed after loading weights into a model made on ``meta``.

        The RoPE table is computed in fp32 and stored in the weights' dtype: the reference casts the
        whole model (this table included) to bf16, and bit-parity needs the same rounded angles.
        """
        rope = llama3_rope_cache(self.flavor.head_dim, self.max_len, device).to(dtype)
        self.register_buffer("rope", rope, persistent=False)
        self.register_buffer("key_positions", torch.arange(self.max_len, device=device), persistent=False)
        self.register_buffer("row_index", torch.arange(0, device=device), persistent=False)

    def fuse_weights(self) -> None:
        for module in self.modules():
            if module is not self and isinstance(module, FusesWeights):
                module.fuse_weights()

    def _attentions(self) -> Iterator[Attention]:
        # nn.ModuleList yields plain Modules to a type checker (torch's typing gap); they are Layers.
        return (layer.attn for layer in cast("list[Layer]", self.layers))

    def setup_caches(self, max_batch: int, dtype: torch.dtype, device: torch.device) -> None:
        for attn in self._attentions():
            attn.setup_cache(max_batch, self.max_len, dtype, device)
        self.row_index = torch.arange(max_batch, device=device)

    def export_prefix(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of the first ``length`` cached positions of one row, per layer (for prefix reuse)."""
        caches = [attn.caches() for attn in self._attentions()]
        return [(k[row, :, :length].clone(), v[row, :, :length].clone()) for k, v in caches]

    def import_prefix(self, row: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write an exported prefix into another row's first positions."""
        for attn, (k, v) in zip(self._attentions(), kv, strict=True):
            k_cache, v_cache = attn.caches()
            k_cache[row, :, : k.size(1)] = k
            v_cache[row, :, : v.size(1)] = v

    def window_for(self, input_pos: torch.Tensor) -> int:
        """The window holding every position in ``input_pos`` (reads them: a device sync on CUDA)."""
        return length_bucket(int(input_pos.max()) + 1, self.max_len)

    def forward(
        self,
        h: torch.Tensor,
        input_pos: torch.Tensor,
        rows: torch.Tensor | CacheWindow | None = None,
        length: int | None = None,
    ) -> torch.Tensor:
        """h (b, s, dim) at positions input_pos (b, s) -> normalised hidden states (model dtype).

        ``rows``: a :class:`CacheWindow` (batch row i is cache row i; pass one to avoid reading
        ``input_pos`` on the host), a tensor (b,) of cache rows (their used positions are gathered),
        or None (rows 0..b-1 with the window that holds ``input_pos``). With a tensor of rows,
        ``length`` is the window (a :func:`length_bucket` above every position) when the caller
        knows it, so that ``input_pos`` is not read on the host.
        """
        b, s, _ = h.shape
        if isinstance(rows, torch.Tensor):
            window = CacheWindow(length if length is not None else self.window_for(input_pos))
            write_rows, gather_rows = rows[:, None], rows
        else:
            window = rows if rows is not None else CacheWindow(self.window_for(input_pos))
            write_rows, gather_rows = self.row_index[:b, None], None
        attend = b if window.attend is None else window.attend
        bias = None
        if window.masked:
            allowed = self.key_positions[: window.length] <= input_pos[:attend, :, None]  # (attend, s, length)
            bias = torch.zeros((), dtype=h.dtype, device=h.device).masked_fill(~allowed, float("-inf"))
            group = self.flavor.num_heads // self.flavor.num_kv_heads
            # query rows are (position, head in group): repeat each position's mask per head
            bias = bias.unsqueeze(2).expand(attend, s, group, window.length).reshape(attend, 1, s * group, -1)
        p = _Pass(
            rotation=self.rope[input_pos].float().unsqueeze(2),
            input_pos=input_pos,
            write_rows=write_rows,
            gather_rows=gather_rows,
            attend=attend,
            length=window.length,
            bias=bias,
        )
        layers = self.compiled_layers if self.compiled_layers and isinstance(rows, CacheWindow) else self.layers
        for layer in layers:
            h = layer(h, p)
        return self.norm(h)


class MisoModel(nn.Module):
    """Backbone + depth decoder + embeddings and heads, named as in the official checkpoint.

    ``weights``: the format of the stacks' linear layers (quantized.py): ``bf16`` (the model's
    dtype, whatever it is), or 8-bit ``int8`` / ``fp8`` (their keys gain a ``weight_scale``).
    """

    codebook_offsets: torch.Tensor  # a buffer: codebook i's codes start at i * audio_vocab_size

    def __init__(self, config: ModelConfig, weights: WeightFormat = "bf16") -> None:
        super().__init__()
        self.config = config
        self.weights = weights
        backbone, decoder = config.backbone, config.decoder
        self.num_codebooks = config.audio_num_codebooks
        self.audio_vocab_size = config.audio_vocab_size
        self.backbone = Transformer(backbone, MAX_SEQ_LEN, weights)
        self.decoder = Transformer(decoder, config.audio_num_codebooks, weights)
        self.text_embeddings = _embedding(config.text_vocab_size, backbone.embed_dim)
        self.audio_embeddings = _embedding(config.audio_vocab_size * config.audio_num_codebooks, backbone.embed_dim)
        self.projection = nn.Linear(backbone.embed_dim, decoder.embed_dim, bias=False)
        self.codebook0_head = nn.Linear(backbone.embed_dim, config.audio_vocab_size, bias=False)
        self.audio_head = nn.Parameter(
            torch.empty(config.audio_num_codebooks - 1, decoder.embed_dim, config.audio_vocab_size)
        )
        self.max_batch = 0
        if not self.audio_head.is_meta:  # built on meta to be loaded: the loader builds them after
            self.init_buffers()

    def init_buffers(self) -> None:
        """Build the non-persistent tables on the weights' device (after a ``meta`` construction + load)."""
        device = self.device
        offsets = torch.arange(self.num_codebooks, device=device) * self.audio_vocab_size
        self.register_buffer("codebook_offsets", offsets, persistent=False)
        self.backbone.init_buffers(device, self.dtype)
        self.decoder.init_buffers(device, self.dtype)

    def fuse_weights(self) -> None:
        """Rebuild the fused q/k/v and w1/w3 matrices and the fp32 norm scales from the official
        tensors where they no longer share them. ``load_state_dict`` (in place or ``assign=True``)
        and device or dtype conversions do it themselves; call it after replacing tensors any
        other way. Costs nothing when all is fused."""
        self.backbone.fuse_weights()
        self.decoder.fuse_weights()

    def compile_layers(self) -> None:
        """Compile both stacks' layers for the frame step (see :meth:`Transformer.compile_layers`)."""
        self.backbone.compile_layers()
        self.decoder.compile_layers()

    def _apply(self, fn, recurse=True):
        # A conversion copies every tensor separately: re-fuse so the official weights are views again.
        super()._apply(fn, recurse)
        self.fuse_weights()
        return self

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
        rows: torch.Tensor | CacheWindow | None = None,
        length: int | None = None,
    ) -> torch.Tensor:
        """Run frames through the backbone (filling the cache rows) and return the last hidden state (b, dim).

        Each batch row has its own positions; ``rows`` and ``length`` as in :meth:`Transformer.forward`.
        """
        return self.backbone(self.embed_frames(tokens, tokens_mask), input_pos, rows, length)[:, -1, :]

    def _embed_audio(self, codebook: int, codes: torch.Tensor) -> torch.Tensor:
        return self.audio_embeddings(codes + codebook * self.audio_vocab_size)

    def decode_frame(
        self, last_h: torch.Tensor, sampling: SamplingState, candidates: int | None = None
    ) -> torch.Tensor:
        """Sample one frame of K codes (b, K) from the backbone's last hidden state.

        Codebook 0 comes from the backbone head; codebooks 1..K-1 from the depth decoder, which
        restarts every frame from ``[h, E0(c0)]`` and uses cache rows 0..b-1. ``candidates`` bounds
        every row's top-k (see :func:`sample_topk`; None: the whole vocabulary, exact for any k).
        """
        b = last_h.size(0)
        noise = sampling.frame_noise(self.num_codebooks, self.audio_vocab_size)
        c0 = sample_topk(self.codebook0_head(last_h), sampling, 0, noise[:, 0], candidates)
        curr_h = torch.cat([last_h.unsqueeze(1), self._embed_audio(0, c0)], dim=1)
        codes = [c0]
        for i in range(1, self.num_codebooks):
            if i == 1:  # positions 0 and 1, causal
                pos, window = self.decoder.key_positions[:2].expand(b, 2), CacheWindow(2)
            else:  # position i alone: it sees exactly positions 0..i
                pos, window = self.decoder.key_positions[i : i + 1].expand(b, 1), CacheWindow(i + 1, masked=False)
            dh = self.decoder(self.projection(curr_h), pos, window)
            logits = torch.mm(dh[:, -1, :], self.audio_head[i - 1])
            ci = sample_topk(logits, sampling, i, noise[:, i], candidates)
            codes.append(ci)
            curr_h = self._embed_audio(i, ci)
        return torch.cat(codes, dim=1)

"""MimiModel: whole-clip encode/decode and a batched, graph-capturable streaming decode.

The computation is moshi 0.2.13's Mimi (``moshi.models.compression.MimiModel`` as built by
``moshi.models.loaders.get_mimi``), reproduced with these behaviours of the original that decide the
output:

* **Whole-clip encode pads the clip with zeros to whole frames** (a multiple of 1920 samples) before
  the encoder, so ``ceil(T / 1920)`` frames come out; nothing else is padded on the right.
* **Causal convolutions pad on the left only**, with zeros; the learnt down-sampler (25 -> 12.5 Hz) pads
  with copies of the clip's first latent step instead (moshi's replicate padding of the first chunk).
* **Attention is limited to the last ``context`` (250) steps in whole clips too**, not only when
  streaming: a clip over 10 s (125 frames on the decoder side, after the x2 up-sampler) is not fully
  connected.
* **Streamed decoding writes a chunk's keys into the ring before attending**, so after the ring wraps the
  first step of each frame sees 249 past steps rather than 250 (see ``transformer.py``); streamed audio
  then differs slightly from whole-clip audio, exactly as moshi's does.
* **Transposed convolutions overlap-add** their trailing ``kernel - stride`` samples into the next chunk
  (less the bias, which the completing chunk adds); whole clips cut them off.
* **The up-sampler is channel-wise** (a grouped transposed convolution, ``groups = 512``, no bias), the
  ``upsample_channel_wise_bug`` moshi keeps for its checkpoints; the down-sampler is a full convolution.
* **Encode picks codes with ``torch.cdist``** on the flattened (B * F) rows, the call moshi makes (see
  ``quantizer.py``); the semantic and acoustic quantizers both read the same (unquantized) latent.
* **Decode uses as many codebooks as the codes carry**; ``num_codebooks`` only limits encode.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from misotts_agents.model.mimi.config import MimiSettings, parse_config
from misotts_agents.model.mimi.conv import CausalConv1d, CausalConvTranspose1d
from misotts_agents.model.mimi.quantizer import SplitQuantizer
from misotts_agents.model.mimi.seanet import SeanetDecoder, SeanetEncoder
from misotts_agents.model.mimi.transformer import ProjectedTransformer, rename_attention_keys

__all__ = ["DecodeState", "MimiModel", "rename_checkpoint_keys"]


def rename_checkpoint_keys(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``tensors`` under the names ``MimiModel.state_dict()`` uses.

    kyutai's released checkpoint stores each attention's projections as ``...self_attn.in_proj_weight``
    and ``...self_attn.out_proj.weight``; moshi (and this model) name them ``self_attn.in_projs.0.weight``
    and ``self_attn.out_projs.0.weight``. ``load_state_dict`` accepts either; use this to compare key
    lists first.
    """
    state = dict(tensors)
    prefixes = {name.rsplit("self_attn.", 1)[0] + "self_attn." for name in state if "self_attn." in name}
    for prefix in prefixes:
        rename_attention_keys(state, prefix)
    return state


class _Downsample(nn.Module):
    """Latent rate -> frame rate: a learnt strided convolution, replicate-padded (``downsample.conv``)."""

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.conv = CausalConv1d(dim, dim, 2 * stride, stride=stride, bias=False, replicate_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    """Frame rate -> latent rate: a channel-wise learnt transposed convolution (``upsample.convtr``)."""

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.convtr = CausalConvTranspose1d(dim, dim, 2 * stride, stride=stride, groups=dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convtr(x)


class DecodeState:
    """Everything a batch of decode streams carries from one frame to the next, one row per stream.

    ``upsample``: the up-sampler's pending overlap; ``cache`` (layers, 2, B, heads, context, head_dim):
    the decoder transformer's ring of keys and values; ``positions`` (B,) int64: steps each row's
    transformer has taken since its reset; ``decoder``: the SEANet decoder's carried samples, layer by
    layer. All are updated in place (fixed addresses, so a captured CUDA graph replays on them).
    """

    def __init__(
        self,
        batch_size: int,
        upsample: list[torch.Tensor],
        cache: torch.Tensor,
        positions: torch.Tensor,
        decoder: list[torch.Tensor],
    ) -> None:
        self.batch_size = batch_size
        self.upsample = upsample
        self.cache = cache
        self.positions = positions
        self.decoder = decoder

    def tensors(self) -> list[torch.Tensor]:
        """Every state tensor (e.g. to snapshot or compare states)."""
        return [*self.upsample, self.cache, self.positions, *self.decoder]

    def rows(self, n: int) -> DecodeState:
        """The leading ``n`` rows as a state of their own, made of views: stepping or resetting it
        updates these rows of this state in place (decode a smaller batch without copying)."""
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"rows must be in 1..{self.batch_size}, got {n}")
        return DecodeState(
            n,
            [t[:n] for t in self.upsample],
            self.cache[:, :, :n],  # (layers, 2, B, ...): rows are dim 2
            self.positions[:n],
            [t[:n] for t in self.decoder],
        )

    def reset(self, mask: torch.Tensor) -> None:
        """Put the rows where ``mask`` (B,) bool is set back to a fresh stream, in place, without a sync.

        Their cache slots are left as they are: at position 0 every slot counts as empty (masked out of
        the attention until written again), as in moshi's reset.
        """
        rows = mask.view(-1, 1, 1)
        for tensor in (*self.upsample, *self.decoder):
            tensor.masked_fill_(rows, 0.0)
        self.positions.masked_fill_(mask, 0)


class MimiModel(nn.Module):
    """Mimi, built from a config in moshi's layout; its state dict is moshi's (same names and shapes).

    Everything runs in the parameters' dtype (float32 for Mimi) on their device.
    """

    def __init__(self, config: Mapping[str, Any], num_codebooks: int = 32) -> None:
        super().__init__()
        settings = parse_config(config)
        self.settings: MimiSettings = settings
        self._config = copy.deepcopy(dict(config))
        dim = settings.seanet.dimension
        stride = settings.resample_stride
        # Registered in moshi's order so state_dict() lists the same keys in the same order.
        self.encoder = SeanetEncoder(settings.seanet)
        self.decoder = SeanetDecoder(settings.seanet)
        self.encoder_transformer = ProjectedTransformer(settings.transformer)
        self.decoder_transformer = ProjectedTransformer(settings.transformer)
        self.quantizer = SplitQuantizer(settings.quantizer)
        self.downsample: _Downsample | None = _Downsample(dim, stride) if stride > 1 else None
        self.upsample: _Upsample | None = _Upsample(dim, stride) if stride > 1 else None
        self._num_codebooks = settings.quantizer.n_q
        self.set_num_codebooks(num_codebooks)
        self.eval()

    # ----------------------------------------------------------------------------------------------
    # Description

    @property
    def config(self) -> dict[str, Any]:
        """The config this model was built from (a deep copy)."""
        return copy.deepcopy(self._config)

    @property
    def sample_rate(self) -> int:
        return self.settings.sample_rate

    @property
    def channels(self) -> int:
        return self.settings.channels

    @property
    def frame_rate(self) -> float:
        return self.settings.frame_rate

    @property
    def frame_size(self) -> int:
        """Audio samples per frame of codes (1920)."""
        return self.settings.frame_size

    @property
    def cardinality(self) -> int:
        """Bins per codebook (2048)."""
        return self.settings.quantizer.bins

    @property
    def total_codebooks(self) -> int:
        return self.settings.quantizer.n_q

    @property
    def num_codebooks(self) -> int:
        """Codebooks encode produces."""
        return self._num_codebooks

    def set_num_codebooks(self, n: int) -> None:
        """Make encode produce the first ``n`` codebooks (at least the semantic ones)."""
        low, high = self.settings.quantizer.n_q_semantic, self.total_codebooks
        if isinstance(n, bool) or not isinstance(n, int) or not low <= n <= high:
            raise ValueError(f"num_codebooks must be an integer in {low}..{high}, got {n!r}")
        self._num_codebooks = n

    def _param(self) -> torch.Tensor:
        return self.quantizer.rvq_first.input_proj.weight

    # ----------------------------------------------------------------------------------------------
    # Whole clips

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, T) audio -> (B, num_codebooks, ceil(T / frame_size)) int64 codes."""
        if x.dim() != 3 or x.shape[1] != self.channels:
            raise ValueError(f"expected audio of shape (B, {self.channels}, T), got {tuple(x.shape)}")
        batch, _, length = x.shape
        frames = -(-length // self.frame_size)
        if frames == 0:
            return torch.zeros(batch, self.num_codebooks, 0, dtype=torch.long, device=x.device)
        x = F.pad(x, (0, frames * self.frame_size - length))  # zeros up to whole frames
        latent = self.encoder_transformer(self.encoder(x))
        if self.downsample is not None:
            latent = self.downsample(latent)
        return self.quantizer.encode(latent, self.num_codebooks)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, K, F) codes -> (B, 1, F * frame_size) audio; K may be fewer than ``total_codebooks``."""
        self._check_codes(codes, 3)
        batch, _, frames = codes.shape
        if frames == 0:
            param = self._param()
            return torch.zeros(batch, self.channels, 0, dtype=param.dtype, device=param.device)
        latent = self.quantizer.decode(codes)
        if self.upsample is not None:
            latent = self.upsample(latent)
        return self.decoder(self.decoder_transformer(latent))

    def _check_codes(self, codes: torch.Tensor, dims: int) -> None:
        if codes.dim() != dims or not 1 <= codes.shape[1] <= self.total_codebooks:
            raise ValueError(
                f"expected codes with {dims} dimensions and 1..{self.total_codebooks} codebooks on dim 1, "
                f"got {tuple(codes.shape)}"
            )
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got {codes.dtype}")

    # ----------------------------------------------------------------------------------------------
    # Streaming decode

    @torch.no_grad()
    def decode_state(self, batch_size: int) -> DecodeState:
        """A fresh state for ``batch_size`` streams, on the model's device and dtype.

        Also computes the codebook table the steps read (so a graph captured afterwards finds it ready).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        param = self._param()
        device, dtype = param.device, param.dtype
        self.quantizer.centroids()
        upsample = [] if self.upsample is None else self.upsample.convtr.new_state(batch_size, device, dtype)
        cache, positions = self.decoder_transformer.new_state(batch_size, device, dtype)
        decoder = self.decoder.new_state(batch_size, device, dtype)
        return DecodeState(batch_size, upsample, cache, positions, decoder)

    @torch.no_grad()
    def decode_step(self, codes: torch.Tensor, state: DecodeState, active: torch.Tensor) -> torch.Tensor:
        """One frame per row: (B, K) int64 codes -> (B, frame_size) audio.

        Rows whose ``active`` (B,) bool is False leave ``state`` exactly as it was (their output is
        meaningless). No host synchronisation, no data-dependent branch or shape: capturable in a CUDA
        graph with ``codes``, ``active`` and ``state`` as the static buffers. The codebook table is
        read from the cache :meth:`decode_state` filled; a graph captured before new weights are loaded
        keeps reading the old table.
        """
        self._check_codes(codes, 2)
        if codes.shape[0] != state.batch_size or active.shape != (state.batch_size,):
            raise ValueError(
                f"codes {tuple(codes.shape)} and active {tuple(active.shape)} do not match the state's "
                f"batch size {state.batch_size}"
            )
        latent = self.quantizer.decode_frame(codes)
        if self.upsample is not None:
            latent = self.upsample.convtr.step(latent, iter(state.upsample), active)
        latent = self.decoder_transformer.step(latent, state.cache, state.positions, active)
        return self.decoder.step(latent, state.decoder, active).view(state.batch_size, self.frame_size)

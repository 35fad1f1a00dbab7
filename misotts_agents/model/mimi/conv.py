"""Causal 1-d convolution and transposed convolution, whole-clip and one chunk at a time.

Each layer has two entry points that give the same samples: ``forward`` for a whole clip and ``step``
for the next chunk of a stream, whose carried-over samples live in a state tensor the caller owns
(one row per stream). ``step`` updates that tensor in place and only for the rows whose ``active``
flag is set, with no host synchronisation, so a CUDA graph can capture it.

The ``nn.Conv1d`` / ``nn.ConvTranspose1d`` sit one module deeper than needed (``conv.conv``,
``convtr.convtr``): that is where moshi's parameter names put them, and the checkpoints use those names.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CausalConv1d", "CausalConvTranspose1d"]

# Chunks of at most this many input steps go through CausalConvTranspose1d._step_by_matmul.
_FEW_STEPS = 4


class _ConvSlot(nn.Module):
    """Holds the convolution under the attribute name ``conv`` (checkpoint naming only)."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.conv = conv


class _ConvTrSlot(nn.Module):
    """Holds the transposed convolution under the attribute name ``convtr`` (checkpoint naming only)."""

    def __init__(self, convtr: nn.ConvTranspose1d) -> None:
        super().__init__()
        self.convtr = convtr


class CausalConv1d(nn.Module):
    """A convolution that only looks back: ``kernel - stride`` past samples (dilated) pad it on the left.

    Whole clip: the left padding is zeros, or with ``replicate_first`` copies of the first sample (moshi's
    down-sampler does that; its first streamed chunk is padded the same way). The clip length must be a
    multiple of the stride, as moshi requires: the caller pads the audio to whole frames instead.
    Streaming: the padding is the tail of the previous chunk, starting from zeros.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        replicate_first: bool = False,
    ) -> None:
        super().__init__()
        self.conv = _ConvSlot(
            nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation, groups=groups, bias=bias)
        )
        self.stride = stride
        self.context = (kernel_size - 1) * dilation + 1 - stride  # past samples each output needs
        self.replicate_first = replicate_first

    @property
    def layer(self) -> nn.Conv1d:
        return self.conv.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.stride:
            raise ValueError(f"length {x.shape[-1]} is not a multiple of the stride {self.stride}")
        if self.context > 0:
            mode = "replicate" if self.replicate_first else "constant"
            x = F.pad(x, (self.context, 0), mode=mode)
        return self.layer(x)

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """The carried-over input samples of a fresh stream (zeros), or nothing without a left context."""
        if self.context <= 0:
            return []
        if self.replicate_first:
            raise ValueError("streaming a replicate-padded convolution is not supported (only whole clips)")
        return [torch.zeros(batch_size, self.layer.in_channels, self.context, device=device, dtype=dtype)]

    def step(self, x: torch.Tensor, states: Iterator[torch.Tensor], active: torch.Tensor) -> torch.Tensor:
        """The next chunk (length a multiple of the stride); takes this layer's state from ``states``."""
        if self.context <= 0:
            return self.layer(x)
        tail = next(states)
        x = torch.cat([tail, x], dim=-1)
        tail.copy_(torch.where(active.view(-1, 1, 1), x[..., -self.context :], tail))
        return self.layer(x)


class CausalConvTranspose1d(nn.Module):
    """A transposed convolution whose last ``kernel - stride`` output samples wait for the next input.

    Whole clip: those trailing samples are cut (the clip ends there). Streaming: they are kept, less
    the bias, and added to the start of the next chunk's output (overlap-add); the bias is then counted
    once, by the chunk that completes them.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.convtr = _ConvTrSlot(
            nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
        )
        self.overlap = kernel_size - stride
        self._by_matmul = groups == 1 and kernel_size == 2 * stride

    @property
    def layer(self) -> nn.ConvTranspose1d:
        return self.convtr.convtr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return y[..., : y.shape[-1] - self.overlap] if self.overlap > 0 else y

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """The pending overlap of a fresh stream (zeros), or nothing when windows do not overlap."""
        if self.overlap <= 0:
            return []
        return [torch.zeros(batch_size, self.layer.out_channels, self.overlap, device=device, dtype=dtype)]

    def step(self, x: torch.Tensor, states: Iterator[torch.Tensor], active: torch.Tensor) -> torch.Tensor:
        """The next chunk; takes this layer's pending overlap from ``states``."""
        if self.overlap <= 0:
            return self.layer(x)
        partial = next(states)
        if self._by_matmul and x.shape[-1] <= _FEW_STEPS:
            y, pending = self._step_by_matmul(x, partial)
        else:
            y = self.layer(x)
            y[..., : self.overlap] += partial
            pending = y[..., -self.overlap :]
            bias = self.layer.bias
            if bias is not None:
                pending = pending - bias[:, None]
            y = y[..., : -self.overlap]
        partial.copy_(torch.where(active.view(-1, 1, 1), pending, partial))
        return y

    def _step_by_matmul(self, x: torch.Tensor, partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kernel = 2 x stride, no groups: one product, then each input step's first half of the window is
        its own output block and the second half is added to the next block (or becomes the pending one).

        Why: PyTorch's CPU transposed convolution takes a slow path for a chunk of a few steps (about
        50 ms for the decoder's first layer, 1024 -> 512 channels on 2 steps, against 3 ms here); on
        longer chunks it is the faster one. The product is the same sum in another order (float
        rounding apart)."""
        b, _, t = x.shape
        weight = self.layer.weight  # (in, out, kernel)
        out_channels, stride = weight.shape[1], self.overlap
        windows = (x.transpose(1, 2) @ weight.flatten(1)).view(b, t, out_channels, 2, stride)
        first, second = windows[:, :, :, 0], windows[:, :, :, 1]
        carried = torch.cat([partial[:, None], second[:, :-1]], dim=1)  # what overlaps each output block
        blocks = first + carried
        bias = self.layer.bias
        if bias is not None:
            blocks = blocks + bias[:, None]
        y = blocks.permute(0, 2, 1, 3).reshape(b, out_channels, t * stride)
        return y, second[:, -1]

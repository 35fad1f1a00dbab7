"""SilentCipher's three networks, with the module names of silentcipher 1.0.5's checkpoints.

``enc_c.ckpt`` fills :class:`CarrierEncoder`, ``dec_c.ckpt`` :class:`CarrierDecoder` and
``dec_m_0.ckpt`` :class:`MessageDecoder`: the attribute names and ``nn.Sequential`` positions below
are chosen so that ``state_dict()`` has exactly the checkpoints' keys and shapes.  Everything works
on spectrogram "images" (B, channels, frequency bins, frames).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

#: Channels of the carrier encoder's output.  Fixed in silentcipher.server.Model (encoder_out_dim).
ENCODER_CHANNELS = 32
#: Channels of every carrier-decoder block but the last; fixed in silentcipher.model.CarrierDecoder.
CARRIER_DECODER_CHANNELS = 96
#: Channels and depth of the message decoder; MsgDecoder's defaults, which the package never changes.
MESSAGE_DECODER_CHANNELS = 128
MESSAGE_DECODER_LAYERS = 10


class InputStatisticsNorm(nn.BatchNorm2d):
    """BatchNorm2d as the package runs it: always normalised with the input's own statistics.

    Quirk kept: silentcipher never calls ``.eval()``, so its BatchNorm layers stay in training mode
    and normalise each call's input by that input's per-channel mean and biased variance (the
    running averages are never used for the output; the package does update them, which is why it
    is not thread-safe).  The package only ever passes one clip, so those statistics are one clip's;
    here every row of a batch is normalised over its own (frequency, frame) plane, which is the
    same thing per row.  ``instance_norm`` without running buffers does exactly that and touches
    no state.  The running buffers exist only so the checkpoint's keys load; they are never read.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(input, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)


class GatedBlock(nn.Module):
    """Conv2d times a sigmoid-gated Conv2d of the same shape, then :class:`InputStatisticsNorm`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)
        self.gate = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)
        self.bn = InputStatisticsNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) * torch.sigmoid(self.gate(x)))


class CarrierEncoder(nn.Module):
    """``enc_c``: features of the carrier magnitude, and the message's spectral pattern.

    ``main`` turns the (B, 1, bins, frames) magnitude into (B, 32, bins, frames); ``linear`` maps
    each frame's one-hot symbol to a pattern over the message band.
    """

    def __init__(self, n_layers: int, message_dim: int, message_band_size: int) -> None:
        super().__init__()
        widths = [1] + [ENCODER_CHANNELS] * n_layers
        self.main = nn.Sequential(*(GatedBlock(a, b) for a, b in itertools.pairwise(widths)))
        self.linear = nn.Linear(message_dim, message_band_size)

    def forward(self, carrier: torch.Tensor) -> torch.Tensor:
        return self.main(carrier)

    def message_plane(self, one_hot: torch.Tensor, n_bins: int) -> torch.Tensor:
        """(1, 1, message_dim, frames) one-hot symbols -> (1, 1, n_bins, frames), zero above the band."""
        plane = self.linear(one_hot.transpose(2, 3)).transpose(2, 3)
        return F.pad(plane, (0, 0, 0, n_bins - plane.shape[2]))


class CarrierDecoder(nn.Module):
    """``dec_c``: the magnitude of the mark, from carrier features, carrier and message plane."""

    def __init__(self, n_layers: int, message_band_size: int) -> None:
        super().__init__()
        c = CARRIER_DECODER_CHANNELS
        blocks = [GatedBlock(3 * ENCODER_CHANNELS, c)]
        blocks += [GatedBlock(c, c) for _ in range(n_layers - 2)]
        blocks.append(GatedBlock(c, 1, kernel_size=1))
        self.main = nn.Sequential(*blocks)
        self.message_band_size = message_band_size

    def forward(self, merged: torch.Tensor, message_sdr: float) -> torch.Tensor:
        """(B, 96, bins, frames) -> (B, 1, bins, frames): non-negative, band-limited, scaled.

        Quirks kept, in the package's order and with its operations: ``abs`` (its
        ensure_negative_message: the mark is only ever subtracted from the carrier); bins at and
        above ``message_band_size`` zeroed (the mark stays below ~11 kHz); each frame divided by its
        own RMS over frequency and by ``10 ** (message_sdr / 20)``.
        """
        h = torch.abs(self.main(merged))
        h[:, :, self.message_band_size :, :] = 0
        return h / torch.mean(h**2, dim=2, keepdim=True) ** 0.5 / (10 ** (message_sdr / 20))


class MessageDecoder(nn.Module):
    """``dec_m_0``: per-frame logits over the message symbols, from the carrier's message band."""

    def __init__(self, message_dim: int, message_band_size: int) -> None:
        super().__init__()
        c = MESSAGE_DECODER_CHANNELS
        widths = [1] + [c] * (MESSAGE_DECODER_LAYERS - 1) + [message_dim]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            # The package puts a Dropout(0) before every block (a no-op); an Identity keeps the
            # blocks at the odd positions its checkpoint keys name (main.1, main.3, ...).
            layers += [nn.Identity(), GatedBlock(a, b)]
        self.main = nn.Sequential(*layers)
        self.linear = nn.Linear(message_band_size, 1)
        self.message_band_size = message_band_size

    def forward(self, carrier: torch.Tensor) -> torch.Tensor:
        """(B, 1, bins, frames) magnitude -> (B, message_dim, frames) logits."""
        h = self.main(carrier[:, :, : self.message_band_size])
        return self.linear(h.transpose(2, 3)).squeeze(3)

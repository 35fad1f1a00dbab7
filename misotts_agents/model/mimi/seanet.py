"""SEANet: the convolutional encoder (audio -> 25 Hz latent) and decoder (latent -> audio).

The layer lists are ``nn.Sequential`` in moshi's order (activations included) because the checkpoint
names layers by their index in that list (``encoder.model.3.conv.conv.weight``). The decoder also
streams: :meth:`SeanetDecoder.new_state` lists every carried tensor in layer order and
:meth:`SeanetDecoder.step` consumes them in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from misotts_agents.model.mimi.config import SeanetSettings
from misotts_agents.model.mimi.conv import CausalConv1d, CausalConvTranspose1d

__all__ = ["ResidualUnit", "SeanetDecoder", "SeanetEncoder"]


class ResidualUnit(nn.Module):
    """x + conv1x1(elu(conv_k(elu(x)))), the hidden width reduced by ``compress``.

    ``block`` keeps the activations at indices 0 and 2 so the convolutions are ``block.1`` and ``block.3``.
    Without ``true_skip`` the skip path is a 1x1 convolution (``shortcut``), as moshi builds it.
    """

    def __init__(self, dim: int, settings: SeanetSettings, dilation: int) -> None:
        super().__init__()
        hidden = dim // settings.compress
        alpha = settings.elu_alpha
        self.block = nn.Sequential(
            nn.ELU(alpha),
            CausalConv1d(dim, hidden, settings.residual_kernel_size, dilation=dilation),
            nn.ELU(alpha),
            CausalConv1d(hidden, dim, 1),
        )
        self.shortcut: nn.Module = nn.Identity() if settings.true_skip else CausalConv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.block(x)

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        return _new_states(self.block, batch_size, device, dtype)  # the 1x1 shortcut carries nothing

    def step(self, x: torch.Tensor, states: Iterator[torch.Tensor], active: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + _step_sequence(self.block, x, states, active)


_Streaming = CausalConv1d | CausalConvTranspose1d | ResidualUnit


def _new_states(layers: nn.Sequential, batch_size: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    return [
        state
        for layer in layers
        if isinstance(layer, _Streaming)
        for state in layer.new_state(batch_size, device, dtype)
    ]


def _step_sequence(
    layers: nn.Sequential, x: torch.Tensor, states: Iterator[torch.Tensor], active: torch.Tensor
) -> torch.Tensor:
    for layer in layers:
        x = layer.step(x, states, active) if isinstance(layer, _Streaming) else layer(x)
    return x


def _residual_units(dim: int, settings: SeanetSettings) -> list[nn.Module]:
    return [ResidualUnit(dim, settings, settings.dilation_base**j) for j in range(settings.n_residual_layers)]


class SeanetEncoder(nn.Module):
    """conv -> per ratio (reversed): residual units, ELU, strided conv doubling the width -> ELU, conv.

    Whole clips only (the package never streams the encoder).
    """

    def __init__(self, settings: SeanetSettings) -> None:
        super().__init__()
        s = settings
        width = s.n_filters
        layers: list[nn.Module] = [CausalConv1d(s.channels, width, s.kernel_size)]
        for ratio in reversed(s.ratios):
            layers += _residual_units(width, s)
            layers += [nn.ELU(s.elu_alpha), CausalConv1d(width, width * 2, 2 * ratio, stride=ratio)]
            width *= 2
        layers += [nn.ELU(s.elu_alpha), CausalConv1d(width, s.dimension, s.last_kernel_size)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class SeanetDecoder(nn.Module):
    """conv -> per ratio: ELU, transposed conv halving the width, residual units -> ELU, conv."""

    def __init__(self, settings: SeanetSettings) -> None:
        super().__init__()
        s = settings
        width = s.n_filters * 2 ** len(s.ratios)
        layers: list[nn.Module] = [CausalConv1d(s.dimension, width, s.kernel_size)]
        for ratio in s.ratios:
            layers += [nn.ELU(s.elu_alpha), CausalConvTranspose1d(width, width // 2, 2 * ratio, stride=ratio)]
            width //= 2
            layers += _residual_units(width, s)
        layers += [nn.ELU(s.elu_alpha), CausalConv1d(width, s.channels, s.last_kernel_size)]
        self.model = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """Every carried tensor of a fresh stream, in layer order (zeros)."""
        return _new_states(self.model, batch_size, device, dtype)

    def step(self, z: torch.Tensor, states: list[torch.Tensor], active: torch.Tensor) -> torch.Tensor:
        """Audio for the next latent chunk; ``states`` (from :meth:`new_state`) are updated in place."""
        return _step_sequence(self.model, z, iter(states), active)

"""Weights a module keeps fused: the stacked q/k/v and w1/w3 matrices, and RMSNorm's fp32 scale.

The official tensors stay under their own names as row views of the fused matrix (one copy in
memory, strict loading and ``state_dict()`` unchanged); ``fuse_weights`` rebuilds what a load or a
conversion separated (in-place loads write through the views), and a ``load_state_dict`` post-hook
calls it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from misotts_agents.model.config import NORM_EPS
from misotts_agents.model.quantized import QuantLinear


@runtime_checkable
class FusesWeights(Protocol):
    """A module keeping derived copies of its weights (fused matrices, an fp32 scale)."""

    def fuse_weights(self) -> None: ...


def refresh_after_load(module: FusesWeights, incompatible_keys: object) -> None:
    module.fuse_weights()  # a load may have replaced (assign=True) or rewritten the official tensors


class RMSNorm(nn.Module):
    # Buffers are declared for type checkers (register_buffer makes them at run time).
    scale_fp32: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.fuse_weights()
        self.register_load_state_dict_post_hook(refresh_after_load)

    def fuse_weights(self) -> None:
        # fp32 scale for F.rms_norm's fused path; for fp32 weights this is the parameter itself.
        self.register_buffer("scale_fp32", self.scale.detach().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the weight dtype, as the reference does.
        return F.rms_norm(x.float(), (x.shape[-1],), self.scale_fp32, NORM_EPS).to(x.dtype)


def fuse_linears(
    owner: nn.Module, names: tuple[str, ...], fused: torch.Tensor | None, attr: str = "weight"
) -> torch.Tensor:
    """One tensor of the bias-free linear children ``names``' ``attr`` (weights, or 8-bit layers'
    ``weight_scale``) stacked by rows; each child's becomes a view of its rows, so the module keeps
    one copy under the official names. ``fused`` is returned as it is while every part is still a
    view of it (an in-place load kept them)."""
    parts = [getattr(getattr(owner, name), attr) for name in names]
    if fused is not None and all(p.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr() for p in parts):
        return fused
    rows = sum(p.size(0) for p in parts)  # (on meta, to be loaded: torch.cat there imports torch._dynamo)
    meta = torch.empty((rows, *parts[0].shape[1:]), dtype=parts[0].dtype, device="meta") if parts[0].is_meta else None
    fused = meta if meta is not None else torch.cat([p.detach() for p in parts])
    for name, part, view in zip(names, parts, fused.split([p.size(0) for p in parts]), strict=True):
        setattr(
            getattr(owner, name),
            attr,
            nn.Parameter(view, requires_grad=False) if isinstance(part, nn.Parameter) else view,
        )
    return fused


def fuse_group(owner: nn.Module, name: str, children: tuple[str, ...]) -> None:
    """``owner.<name>`` := the ``children``'s weights stacked (:func:`fuse_linears`), and for 8-bit
    layers ``owner.<name>_scale`` := their scales stacked the same way."""
    setattr(owner, name, fuse_linears(owner, children, getattr(owner, name)))
    if isinstance(getattr(owner, children[0]), QuantLinear):
        scales = fuse_linears(owner, children, getattr(owner, name + "_scale"), "weight_scale")
        setattr(owner, name + "_scale", scales)

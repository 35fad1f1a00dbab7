"""8-bit weights for the linear layers of the backbone and the depth decoder: int8 and fp8.

Every output channel (weight row) has its own scale, ``w ~= q * scale[:, None]``, symmetric (no
zero point): int8 ``q`` in [-127, 127], or fp8 e4m3 in [-448, 448]. Per channel, because one row
with large weights then costs only that row its resolution, and because the scale multiplies the
product's output column after the matrix product, which itself reads one byte per weight.

- **int8** (any device) is gpt-fast's WeightOnlyInt8Linear: ``F.linear(x, q.to(x.dtype)) * scale``.
  Eagerly the conversion is a kernel of its own (correct, not faster than bf16); under
  ``torch.compile`` inductor fuses it into the product's loads, and on CUDA the frame step runs
  compiled layers under CUDA graphs (engine/step.py), so a step should read the int8 bytes (not
  yet measured on a GPU).
- **fp8** (CUDA, compute capability >= 8.9) quantizes the activations per row on the fly and
  multiplies e4m3 x e4m3 on the tensor cores (``torch._scaled_mm``, row-wise scales, bf16 out).

What stays in the model's dtype (bf16 on CUDA) and why: the embeddings (a frame reads 33 of their
rows, not the matrices: nothing to save in bandwidth), the RMSNorm scales (tiny; the norm runs in
fp32), and ``projection``, ``codebook0_head`` and ``audio_head``: together 1.8% of the bytes an 8B
frame reads (README, "8-bit weights"), and the heads make the logits the codes are drawn from.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from misotts_agents.model.config import WeightFormat
from misotts_agents.model.tensorfile import TensorFile

STORAGE: dict[str, torch.dtype] = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_LIMIT = {"int8": 127.0, "fp8": torch.finfo(torch.float8_e4m3fn).max}
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: fp8 tensor cores
BLOCK_BYTES = 8 << 20  # fp32 rows quantized at once (the lean loader's piece size)


def check_supported(weights: WeightFormat, device: torch.device) -> None:
    """Refuse fp8 where the device has no fp8 tensor cores (before any weight is read)."""
    if weights != "fp8":
        return
    need = ".".join(map(str, FP8_MIN_CAPABILITY))
    if device.type != "cuda":
        raise ValueError(f"weights='fp8' needs a CUDA GPU of compute capability >= {need}; not {device}: use 'int8'")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"weights='fp8' needs compute capability >= {need}; {torch.cuda.get_device_name(device)} has "
            f"{capability[0]}.{capability[1]}: use 'int8'"
        )


def scale_dtype(weights: WeightFormat, dtype: torch.dtype) -> torch.dtype:
    """int8 scales multiply outputs in the model's dtype; ``_scaled_mm`` takes fp32 scales."""
    return torch.float32 if weights == "fp8" else dtype


@torch.no_grad()
def quantize_rows(weight: torch.Tensor, weights: WeightFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, fp32 scale per row) of a 2-D weight: ``q * scale[:, None]`` approximates it."""
    q = torch.empty(weight.shape, dtype=STORAGE[weights], device=weight.device)
    return q, _quantize_into(weight.to(torch.float32, copy=True), weights, q)


def _quantize_into(block: torch.Tensor, weights: WeightFormat, out: torch.Tensor) -> torch.Tensor:
    """Quantize the fp32 rows ``block`` into ``out`` and return their scales. ``block`` is
    overwritten: no temporary of its size is made (loading's peak is the model plus one block)."""
    limit = _LIMIT[weights]
    scale = torch.maximum(block.amax(dim=1), block.amin(dim=1).neg_()).clamp_(min=1e-12).div_(limit)
    block.div_(scale[:, None])
    if weights == "int8":
        block.round_()
    out.copy_(block.clamp_(-limit, limit))
    return scale


def quantize_streamed(f: TensorFile, name: str, weights: WeightFormat, out: torch.Tensor, scales: torch.Tensor) -> None:
    """Quantize tensor ``name`` of an open checkpoint into ``out`` (8-bit, on its device) and
    ``scales`` (any float dtype), a block of rows at a time: memory holds the result plus one block
    of at most :data:`BLOCK_BYTES` in fp32."""
    rows, cols = f.tensors[name].shape
    step = max(1, BLOCK_BYTES // (4 * cols))
    block = torch.empty(min(step, rows), cols, dtype=torch.float32, device=out.device)
    for first in range(0, rows, step):
        part = block[: min(step, rows - first)]
        f.read_into(name, part, first_row=first)
        scales[first : first + len(part)] = _quantize_into(part, weights, out[first : first + len(part)])


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T`` for a full-precision weight (``scale`` None) or an 8-bit one and its scales."""
    if scale is None:
        return F.linear(x, weight)
    if weight.dtype == torch.int8:
        return F.linear(x, weight.to(x.dtype)) * scale
    flat = x.reshape(-1, x.size(-1))
    x_scale = flat.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / _LIMIT["fp8"]
    xq = (flat.float() / x_scale).clamp(-_LIMIT["fp8"], _LIMIT["fp8"]).to(torch.float8_e4m3fn)
    scaled_mm = torch._scaled_mm  # pyright: ignore[reportPrivateImportUsage] - the public fp8 product
    out = scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale[None, :], out_dtype=torch.bfloat16)
    return out.view(*x.shape[:-1], -1).to(x.dtype)  # row-wise scales need a bf16 output


class QuantLinear(nn.Module):
    """A bias-free linear layer with 8-bit weights: buffers ``weight`` (out, in) and
    ``weight_scale`` (out,), both in ``state_dict`` under the layer's name (the quantized
    checkpoint's keys)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, weights: WeightFormat) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=STORAGE[weights]))
        dtype = scale_dtype(weights, torch.get_default_dtype())
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.weight_scale)


def make_linear(in_features: int, out_features: int, weights: WeightFormat) -> nn.Linear | QuantLinear:
    """The stacks' linear layer for a weight format: ``nn.Linear`` (bf16: the model's dtype) or 8-bit."""
    if weights == "bf16":
        return nn.Linear(in_features, out_features, bias=False)
    return QuantLinear(in_features, out_features, weights)

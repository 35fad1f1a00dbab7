"""Strict loading of `model.safetensors` into :class:`MisoModel`.

The model is built on the ``meta`` device; the file's header is checked against it (a missing,
extra, mis-shaped or wrongly typed key is an error naming the key, never a partial load); then every
tensor is read, converted to the target dtype and placed on the target device one at a time,
straight from the file into its destination (tensorfile.py: plain reads in pieces, no mapping of
the file). Why: the 8B checkpoint is 32.75 GB of fp32; materialising it, or keeping it mapped
while the bf16 copy is made, would need file + model in host memory. The peak is the model in its
target dtype plus one 64 MB piece (on CUDA, the model is on the device and the host holds one piece).
With 8-bit weights (quantized.py) each linear layer's weight is quantized as it streams in, 64 MB
of fp32 rows at a time, so no full-precision copy of the model ever exists: the peak is the 8-bit
model plus one block. A checkpoint written by ``misotts-agents quantize`` (quantize.py) holds the
8-bit weights and their scales (``...weight_scale``), named in its config.json, and is read as it is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from misotts_agents.errors import CheckpointError
from misotts_agents.model.config import ModelConfig, WeightFormat, parse_weights
from misotts_agents.model.quantized import (
    STORAGE,
    QuantLinear,
    quantize_streamed,
    scale_dtype,
)
from misotts_agents.model.tensorfile import TensorFile, TensorFileError
from misotts_agents.model.transformer import MisoModel

log = logging.getLogger(__name__)


QUANTIZATION_KEY = "quantization"  # config.json's entry naming a pre-quantized checkpoint's format


def expected_shapes(config: ModelConfig, weights: WeightFormat = "bf16") -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in layout(config, weights).items()}


def layout(config: ModelConfig, weights: WeightFormat) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as meta tensors (shape and dtype), for ``weights``."""
    with torch.device("meta"):
        return MisoModel(config, weights).state_dict()


def stored_weights(config_json: dict[str, Any], source: str = "config.json") -> WeightFormat:
    """The format a checkpoint's weights are stored in: ``bf16`` (full precision: the official
    fp32 file) unless its config says it was written by ``misotts-agents quantize``."""
    entry = config_json.get(QUANTIZATION_KEY)
    if entry is None:
        return "bf16"
    try:
        return parse_weights(entry["weights"])
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{source}: bad {QUANTIZATION_KEY!r} entry {entry!r}: {exc}") from None


def read_config(path: Path) -> tuple[ModelConfig, WeightFormat]:
    """A checkpoint's config.json: the model's configuration and the format its weights are stored in."""
    config = ModelConfig.load(path)
    return config, stored_weights(json.loads(path.read_text()), str(path))


def _describe(keys: list[str]) -> str:
    shown = ", ".join(keys[:8])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def open_checked(path: Path, config: ModelConfig, stored: WeightFormat) -> TensorFile:
    """Open ``path`` and check its header against the model's layout for ``stored`` weights: a
    missing, extra, mis-shaped or wrongly typed key is a :class:`CheckpointError` naming it."""
    wanted = layout(config, stored)
    try:
        f = TensorFile(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except (TensorFileError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    present = set(f.tensors)
    missing = sorted(set(wanted) - present)
    unexpected = sorted(present - set(wanted))
    problems = []
    if missing:
        problems.append(f"missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_describe(unexpected)}")
    for key in sorted(present & set(wanted)):
        info, want = f.tensors[key], wanted[key]
        eight_bit = want.dtype in STORAGE.values()
        if info.shape != tuple(want.shape):
            problems.append(f"{key} has shape {info.shape}, the config expects {tuple(want.shape)}")
        elif eight_bit and info.dtype != want.dtype:
            problems.append(f"{key} has dtype {info.dtype}, expected {want.dtype} ({stored} weights)")
        elif not eight_bit and (not info.dtype.is_floating_point or info.dtype in STORAGE.values()):
            problems.append(f"{key} has dtype {info.dtype}, expected floating point weights")
    if problems:
        f.close()
        kind = "" if stored == "bf16" else f" with {stored} weights"
        raise CheckpointError(
            f"{path} does not match the model config ({config.backbone_flavor} / {config.decoder_flavor}){kind}: "
            + "; ".join(problems)
        )
    return f


def _allocate_8bit(model: MisoModel, weights: WeightFormat, scales: torch.dtype, device: torch.device) -> None:
    """Allocate the 8-bit layers' tensors where they will live: each fused group (q/k/v, w1/w3) as
    one tensor whose row blocks the layers' weights and scales are views of, so loading writes them
    in place. Stacking them after loading would free every part again and leave the host's heap
    fragmented (measured at CSM-1B size: 0.46 GB more at the peak)."""
    for module in model.modules():
        name, children = getattr(module, "FUSED", (None, ()))
        parts = [getattr(module, c) for c in children]
        if name is None or not all(isinstance(p, QuantLinear) for p in parts):
            continue
        for attr, part, dtype in ((name, "weight", STORAGE[weights]), (name + "_scale", "weight_scale", scales)):
            sizes = [getattr(p, part).size(0) for p in parts]
            stacked = torch.empty(sum(sizes), *getattr(parts[0], part).shape[1:], dtype=dtype, device=device)
            setattr(module, attr, stacked)
            for p, view in zip(parts, stacked.split(sizes), strict=True):
                setattr(p, part, view)
    for layer in model.modules():
        if isinstance(layer, QuantLinear) and layer.weight.is_meta:  # not fused: output_proj, w2
            layer.weight = torch.empty(layer.weight.shape, dtype=STORAGE[weights], device=device)
            layer.weight_scale = torch.empty(layer.weight_scale.shape, dtype=scales, device=device)


ROUNDING_BLOCK_ELEMENTS = 4 * 1024 * 1024  # 16 MB of fp32 at a time: no second copy of an embedding


def _round_to_bf16(tensor: torch.Tensor) -> None:
    """Round an fp32 tensor to bf16 precision in place, a block at a time (a whole-tensor
    ``to(bfloat16)`` would hold half the audio embedding again at the loading peak)."""
    flat = tensor.view(-1)
    for start in range(0, flat.numel(), ROUNDING_BLOCK_ELEMENTS):
        block = flat[start : start + ROUNDING_BLOCK_ELEMENTS]
        block.copy_(block.to(torch.bfloat16))


def load_model(
    path: str | Path,
    config: ModelConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    weights: WeightFormat = "bf16",
    stored: WeightFormat = "bf16",
) -> MisoModel:
    """Build the model and fill it from ``path``; any missing, unexpected or mis-shaped key is an error.

    ``weights``: the stacks' linear layers in ``dtype`` (``bf16``) or 8-bit (quantized.py);
    ``stored``: what the file holds (:func:`stored_weights`). Full-precision weights are quantized
    as they stream in, a block of rows at a time; a pre-quantized file is read as it is. With 8-bit
    weights the tensors left in full precision carry bf16's precision whatever ``dtype`` is (what a
    quantized file stores), so both routes give the same model.
    """
    path = Path(path)
    device = torch.device(device)
    if stored not in ("bf16", weights):
        raise CheckpointError(
            f"{path} holds {stored} weights (config.json {QUANTIZATION_KEY!r}): load it with weights={stored!r}"
        )
    with torch.device("meta"):
        model = MisoModel(config, weights)
    modules = dict(model.named_modules())
    quantize_now = weights != stored
    if weights != "bf16":
        _allocate_8bit(model, weights, scale_dtype(weights, dtype), device)
    with open_checked(path, config, stored) as f:
        # Each tensor goes straight into its module, which then holds the only reference: no dict of
        # every tensor outlives the loop, so fusing below frees each module's originals as it goes.
        in_file_order = sorted(f.tensors, key=lambda k: f.tensors[k].offset)  # sequential reads
        for key in tqdm(in_file_order, desc=f"loading {path.name}", unit="tensor", disable=not progress):
            owner, _, name = key.rpartition(".")
            module, declared = modules[owner], getattr(modules[owner], name)
            try:
                if isinstance(module, QuantLinear):  # into its place in the fused tensors
                    if quantize_now:
                        quantize_streamed(f, key, weights, module.weight, module.weight_scale)
                    else:
                        f.read_into(key, declared)  # allocated in place by _allocate_8bit
                    continue
                tensor = torch.empty(declared.shape, dtype=dtype, device=device)
                f.read_into(key, tensor)
            except (TensorFileError, OSError) as exc:
                raise CheckpointError(f"{path}: cannot read tensor {key}: {exc}") from exc
            if weights != "bf16" and tensor.dtype == torch.float32:
                _round_to_bf16(tensor)  # bf16 precision, as a quantized file holds it
            setattr(
                module,
                name,
                nn.Parameter(tensor, requires_grad=False) if isinstance(declared, nn.Parameter) else tensor,
            )
    model.init_buffers()
    model.fuse_weights()  # fused q/k/v and w1/w3 (official names as views), one module at a time
    unfilled = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unfilled:  # a tensor the model gained that neither the checkpoint nor init_buffers fills
        raise RuntimeError(f"model tensors left unfilled after loading: {_describe(unfilled)}")
    model.eval().requires_grad_(False)
    log.info("loaded %s (%d tensors, %s, %s weights, %s)", path, len(f.tensors), dtype, weights, device)
    return model

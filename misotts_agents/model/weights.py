"""Strict loading of `model.safetensors` into :class:`MisoModel`.

The model is built on the ``meta`` device; the file's header is checked against it (a missing,
extra, mis-shaped or non-float key is an error naming the key, never a partial load); then every
tensor is read, converted to the target dtype and placed on the target device one at a time,
straight from the file into its destination (tensorfile.py: plain reads in pieces, no mapping of
the file). Why: the 8B checkpoint is 32.75 GB of fp32; materialising it, or keeping it mapped
while the bf16 copy is made, would need file + model in host memory. The peak is the model in its
target dtype plus one 64 MB piece (on CUDA, the model is on the device and the host holds one piece).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from misotts_agents.errors import CheckpointError
from misotts_agents.model.config import ModelConfig
from misotts_agents.model.tensorfile import TensorFile, TensorFileError
from misotts_agents.model.transformer import MisoModel

log = logging.getLogger(__name__)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = MisoModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _describe(keys: list[str]) -> str:
    shown = ", ".join(keys[:8])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def load_model(
    path: str | Path,
    config: ModelConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> MisoModel:
    """Build the model and fill it from ``path``; any missing, unexpected or mis-shaped key is an error."""
    path = Path(path)
    device = torch.device(device)
    with torch.device("meta"):
        model = MisoModel(config)
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        handle = TensorFile(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except (TensorFileError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    with handle as f:
        present = set(f.tensors)
        missing = sorted(set(wanted) - present)
        unexpected = sorted(present - set(wanted))
        problems = []
        if missing:
            problems.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_describe(unexpected)}")
        for key in sorted(present & set(wanted)):
            shape = f.tensors[key].shape
            if shape != wanted[key]:
                problems.append(f"{key} has shape {shape}, the config expects {wanted[key]}")
            elif not f.tensors[key].dtype.is_floating_point:
                problems.append(f"{key} has dtype {f.tensors[key].dtype}, expected floating point weights")
        if problems:
            raise CheckpointError(
                f"{path} does not match the model config ({config.backbone_flavor} / {config.decoder_flavor}): "
                + "; ".join(problems)
            )
        # Each tensor goes straight into its module, which then holds the only reference: no dict of
        # every tensor outlives the loop, so fusing below frees each module's originals as it goes.
        modules = dict(model.named_modules())
        in_file_order = sorted(wanted, key=lambda k: f.tensors[k].offset)  # sequential reads
        for key in tqdm(in_file_order, desc=f"loading {path.name}", unit="tensor", disable=not progress):
            tensor = torch.empty(wanted[key], dtype=dtype, device=device)
            try:
                f.read_into(key, tensor)
            except (TensorFileError, OSError) as exc:
                raise CheckpointError(f"{path}: cannot read tensor {key}: {exc}") from exc
            owner, _, name = key.rpartition(".")
            setattr(modules[owner], name, nn.Parameter(tensor, requires_grad=False))
    model.init_buffers()
    model.fuse_weights()  # fused q/k/v and w1/w3 (official names as views), one module at a time
    unfilled = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unfilled:  # a tensor the model gained that neither the checkpoint nor init_buffers fills
        raise RuntimeError(f"model tensors left unfilled after loading: {_describe(unfilled)}")
    model.eval().requires_grad_(False)
    log.info("loaded %s (%d tensors, %s, %s)", path, len(wanted), dtype, device)
    return model

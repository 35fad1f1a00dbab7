"""Models and engines with random weights made directly on the device: no checkpoint, no download.

For benchmarks (``misotts-agents bench --random-weights llama-8B``, benchmarks/frame_step.py) and
the prepared GPU check (scripts/gpu_check.sh): a lent GPU is a bare machine for minutes, so the 8B
layout is built there, in its dtype, in seconds. The work per frame is the real model's (same
shapes, same kernels); the audio is noise.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from misotts_agents.engine.miso_engine import MisoEngine
from misotts_agents.model.config import CSM_1B, FLAVORS, MISOTTS_8B, ModelConfig, WeightFormat
from misotts_agents.model.mimi import MimiModel, default_config
from misotts_agents.model.quantized import QuantLinear, check_supported, quantize_rows
from misotts_agents.model.tensorfile import write_tensorfile
from misotts_agents.model.tokenizer import TextTokenizer
from misotts_agents.model.transformer import MisoModel
from misotts_agents.model.weights import expected_shapes
from misotts_agents.testing.mimi import build_tiny_mimi, random_mimi_model
from misotts_agents.testing.tiny import TINY_CONFIG, bundled_tokenizer

# A backbone flavor name picks the released model it belongs to.
NAMED = {"llama-8B": MISOTTS_8B, "llama-1B": CSM_1B, "tiny": TINY_CONFIG}


def random_config(spec: str) -> ModelConfig:
    """``llama-8B`` (MisoTTS 8B), ``llama-1B`` (CSM-1B), ``tiny`` (the test checkpoint's sizes), a
    ``config.json`` path, or the JSON of a config (custom flavors as dicts of sizes)."""
    if spec in NAMED:
        return NAMED[spec]
    if spec in FLAVORS:
        raise ValueError(f"{spec!r} is a decoder flavor; name a backbone: {sorted(NAMED)}")
    if spec.lstrip().startswith("{"):
        try:
            return ModelConfig.from_dict(json.loads(spec), "--random-weights")
        except json.JSONDecodeError as exc:
            raise ValueError(f"--random-weights: not valid JSON: {exc}") from None
    path = Path(spec)
    if path.is_file():
        return ModelConfig.load(path)
    raise ValueError(f"--random-weights takes {sorted(NAMED)}, a config.json path or a JSON config; got {spec!r}")


@torch.no_grad()
def random_model_on(
    config: ModelConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int = 0,
    std: float = 0.02,
    weights: WeightFormat = "bf16",
) -> MisoModel:
    """A model with N(0, std) weights (norm scales 1) allocated and drawn on ``device`` in ``dtype``;
    with 8-bit ``weights`` each linear layer is drawn in fp32 and quantized, one layer at a time."""
    device = torch.device(device)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: never an fp32 copy of 8B parameters
    try:
        with torch.device("meta"):
            model = MisoModel(config, weights)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith(".scale"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=generator)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            drawn = torch.empty(module.weight.shape, device=device).normal_(0.0, std, generator=generator)
            q, scale = quantize_rows(drawn, weights)
            module.weight.copy_(q)
            module.weight_scale.copy_(scale)
    model.init_buffers()
    model.fuse_weights()
    return model.eval().requires_grad_(False)


def write_random_checkpoint(path: Path, config: ModelConfig, seed: int = 0) -> int:
    """An fp32 safetensors file with the official keys and N(0, 0.02) values (norm scales 1),
    written one tensor at a time (tensorfile.py); returns its size."""
    shapes = dict(sorted(expected_shapes(config).items()))
    generator = torch.Generator().manual_seed(seed)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for key, shape in shapes.items():
            yield key, torch.ones(shape) if key.endswith(".scale") else torch.randn(shape, generator=generator) * 0.02

    write_tensorfile(path, {k: (torch.float32, shape) for k, shape in shapes.items()}, tensors())
    return path.stat().st_size


def random_mimi(device: torch.device | str, full_size: bool, seed: int = 0) -> MimiModel:
    """A random-weight Mimi on ``device``: the real configuration (79 M parameters, the real decode
    cost) or the tiny test one; codebooks filled so codes decode to distinct vectors."""
    if not full_size:
        return build_tiny_mimi(seed).to(device)
    return random_mimi_model(default_config(), device, seed)


def random_engine(
    spec: str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    tokenizer: str | Path | None = None,
    full_size_mimi: bool | None = None,
    seed: int = 0,
    weights: WeightFormat = "bf16",
    **engine_options: Any,
) -> MisoEngine:
    """An engine over :func:`random_model_on` weights (no watermark): the real serving path at any
    layout. ``tokenizer`` defaults to the Llama-3.2 ``tokenizer.json`` of the dev dependency;
    ``full_size_mimi`` defaults to on for the released layouts (``llama-8B``, ``llama-1B``)."""
    config = random_config(spec)
    path = Path(tokenizer) if tokenizer is not None else bundled_tokenizer()
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path} (pass one: the dev dependency ships it)")
    if full_size_mimi is None:
        full_size_mimi = config in (MISOTTS_8B, CSM_1B)
    check_supported(weights, torch.device(device))
    model = random_model_on(config, device, dtype, seed, weights=weights)
    mimi = random_mimi(device, full_size_mimi, seed)
    return MisoEngine(model, TextTokenizer(path), mimi, None, **engine_options)

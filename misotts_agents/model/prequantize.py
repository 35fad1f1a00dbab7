"""`misotts-agents quantize SRC DST`: a checkpoint directory whose linear layers are stored 8-bit.

The official checkpoint is fp32 (32.75 GB for the 8B model); quantizing it at every load reads all
of it. The directory written here holds ``model.safetensors`` with the stacks' linear weights in
int8 (or fp8) and their ``weight_scale`` (fp32, one per output channel), every other tensor in
bf16, and a ``config.json`` whose ``quantization`` entry says so; every other file of SRC
(tokenizer, Mimi, SilentCipher) is copied. ``MisoEngine.load(DST, weights="int8")`` then reads it
with the same strict key check, and no fp32 file is needed. The conversion streams: one tensor (and
one 64 MB block of fp32 rows) in memory at a time; the tensors are those quantizing at load makes,
so both routes give the same model and the same codes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from misotts_agents.errors import CheckpointError
from misotts_agents.model.config import WeightFormat
from misotts_agents.model.quantized import STORAGE, quantize_streamed
from misotts_agents.model.sources import fetch_file
from misotts_agents.model.tensorfile import TensorFile, write_tensorfile
from misotts_agents.model.weights import QUANTIZATION_KEY, layout, open_checked, read_config

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SCALE_SUFFIX = "_scale"  # ``...q_proj.weight`` -> ``...q_proj.weight_scale``


def quantize_checkpoint(
    source: str | Path, destination: str | Path, weights: WeightFormat = "int8", progress: bool = True
) -> Path:
    """Write ``source`` (a directory or Hub repo id of a full-precision checkpoint) to the directory
    ``destination`` with ``weights`` (int8 or fp8) linear layers; returns ``destination``."""
    if weights == "bf16":
        raise ValueError("quantize writes 8-bit weights: weights must be int8 or fp8")
    config_path = fetch_file(source, CONFIG_FILE, "model config")
    config, stored = read_config(config_path)
    if stored != "bf16":
        raise CheckpointError(f"{source} is already quantized ({stored}); quantize the full-precision checkpoint")
    weights_path = fetch_file(source, WEIGHTS_FILE, "model weights")
    out = Path(destination).expanduser()
    if out.resolve() == weights_path.parent.resolve():
        raise ValueError(f"{out} is the source directory: write the quantized checkpoint elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    eight_bit = {k for k, t in layout(config, weights).items() if t.dtype == STORAGE[weights]}
    with open_checked(weights_path, config, "bf16") as f:
        order = sorted(f.tensors, key=lambda k: f.tensors[k].offset)
        plan: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for key in order:
            shape = f.tensors[key].shape
            if key in eight_bit:
                plan[key] = (STORAGE[weights], shape)
                plan[key + SCALE_SUFFIX] = (torch.float32, shape[:1])
            else:
                plan[key] = (torch.bfloat16, shape)
        partial = out / (WEIGHTS_FILE + ".partial")  # a failed run leaves no file that looks complete
        try:
            tensors = _converted(f, order, eight_bit, weights, progress)
            write_tensorfile(partial, plan, tensors, metadata={"format": "pt", QUANTIZATION_KEY: weights})
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    partial.replace(out / WEIGHTS_FILE)
    entry = {"weights": weights, "scales": "fp32, one per output channel (weight_scale)", "source": str(source)}
    raw = json.loads(config_path.read_text())
    (out / CONFIG_FILE).write_text(json.dumps({**raw, QUANTIZATION_KEY: entry}, indent=2) + "\n")
    for item in weights_path.parent.iterdir():  # tokenizer.json, Mimi, silentcipher/ ...
        if item.name in (WEIGHTS_FILE, CONFIG_FILE):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, out / item.name)
    return out


def _converted(
    f: TensorFile, order: list[str], eight_bit: set[str], weights: WeightFormat, progress: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """The quantized file's tensors in its order: 8-bit weights and their scales, the rest in bf16."""
    for key in tqdm(order, desc=f"quantizing {f.path.name} to {weights}", unit="tensor", disable=not progress):
        if key in eight_bit:
            q = torch.empty(f.tensors[key].shape, dtype=STORAGE[weights])
            scale = torch.empty(q.size(0))
            quantize_streamed(f, key, weights, q, scale)
            yield key, q
            yield key + SCALE_SUFFIX, scale
        else:
            tensor = torch.empty(f.tensors[key].shape, dtype=torch.bfloat16)
            f.read_into(key, tensor)
            yield key, tensor

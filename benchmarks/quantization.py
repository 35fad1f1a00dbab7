"""What 8-bit weights cost in fidelity, and what they save in memory while loading: CPU, one run.

For each size (``tiny``: the test checkpoint; ``csm-1b``: a random checkpoint of CSM-1B size, 1.55 B
parameters, 6.2 GB of fp32 written to ``--dir`` and deleted) the same random sequence of
``--frames`` audio frames is fed teacher-forced (testing/fidelity.py) through the checkpoint loaded
by the real loader as

- ``fp32``: the reference; ``bf16``: weights and compute in bf16 (what CUDA runs by default);
- ``int8``: int8 linear layers quantized while loading, compute in fp32 (the CPU default);
- ``int8+bf16``: the same with bf16 compute (what an int8 engine on CUDA runs),

and reports each one's relative error (Frobenius) against fp32 and against bf16: every layer's
output, the codebook-0 logits (backbone) and the codebooks 1..31 logits (depth decoder), and how
often the top-1 / top-50 tokens (50: the default top-k) agree with fp32's. Then, for ``csm-1b``,
the peak resident size of loading bf16 and int8 in fresh processes (benchmarks/loading.py's child).

Random weights are not trained ones: their rows have no outliers and their activations no
structure, so the int8 error here is only a rough guide to the error on real weights (the check on
those is scripts/quantization_wer.py: word error rate of the same prompts in bf16 and int8).

    uv run python benchmarks/quantization.py                        # tiny + CSM-1B size (~10 GB free, ~10 min)
    uv run python benchmarks/quantization.py --sizes tiny --frames 300
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from misotts_agents.model.config import CSM_1B, ModelConfig, WeightFormat
from misotts_agents.model.weights import load_model
from misotts_agents.testing.fidelity import Outputs, relative_error, teacher_forced, topk_agreement
from misotts_agents.testing.random_weights import write_random_checkpoint
from misotts_agents.testing.tiny import TINY_CONFIG, make_tiny

LOADING = Path(__file__).with_name("loading.py")
VARIANTS: dict[str, tuple[WeightFormat, torch.dtype]] = {
    "fp32": ("bf16", torch.float32),
    "bf16": ("bf16", torch.bfloat16),
    "int8": ("int8", torch.float32),
    "int8+bf16": ("int8", torch.bfloat16),
}


def checkpoint(size: str, directory: Path) -> tuple[Path, ModelConfig]:
    if size == "tiny":
        return make_tiny(directory) / "model.safetensors", TINY_CONFIG
    path = directory / "model.safetensors"
    written = write_random_checkpoint(path, CSM_1B)
    print(f"wrote {path} ({written / 1e9:.2f} GB fp32)", flush=True)
    return path, CSM_1B


def fidelity(path: Path, config: ModelConfig, frames: int) -> dict[str, Outputs]:
    codes = torch.randint(0, 2048, (frames, config.audio_num_codebooks), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for name, (weights, dtype) in VARIANTS.items():
        started = time.perf_counter()
        model = load_model(path, config, dtype=dtype, progress=False, weights=weights)
        outputs[name] = teacher_forced(model, codes)
        del model
        gc.collect()
        print(f"  {name:<10} {time.perf_counter() - started:6.1f} s", flush=True)
    return outputs


def report(size: str, outputs: dict[str, Outputs]) -> dict:
    fp32, bf16 = outputs["fp32"], outputs["bf16"]
    rows = {}
    print(f"\n{size}: relative error (Frobenius) and agreement with fp32, {len(fp32.c0_logits)} frames")
    head = f"{'':<22}" + "".join(f"{n:>14}" for n in ("bf16", "int8", "int8+bf16", "int8 vs bf16"))
    print(head)

    def line(label: str, values: list[float], fmt: str) -> None:
        print(f"{label:<22}" + "".join(f"{v:>14{fmt}}" for v in values))
        rows[label] = values

    ours = [outputs["bf16"], outputs["int8"], outputs["int8+bf16"]]
    for layer in fp32.layers:
        values = [relative_error(o.layers[layer], fp32.layers[layer]) for o in ours]
        line(f"layer {layer}", [*values, relative_error(outputs["int8+bf16"].layers[layer], bf16.layers[layer])], ".4f")
    for label, pick in (("codebook-0 logits", "c0_logits"), ("depth logits", "depth_logits")):
        values = [relative_error(getattr(o, pick), getattr(fp32, pick)) for o in ours]
        line(label, [*values, relative_error(getattr(outputs["int8+bf16"], pick), getattr(bf16, pick))], ".4f")
        for k in (1, 50):
            agree = [topk_agreement(getattr(o, pick), getattr(fp32, pick), k) for o in ours]
            vs_bf16 = topk_agreement(getattr(outputs["int8+bf16"], pick), getattr(bf16, pick), k)
            line(f"  top-{k} agreement", [*agree, vs_bf16], ".3f")
    return rows


def peak_rss(path: Path, size: str) -> dict[str, dict]:
    """Peak RSS of loading ``path`` in bf16 and in int8 (bf16 for the rest), each in a fresh process."""
    figures = {}
    for loader in ("lean", "int8"):
        child = [sys.executable, str(LOADING), "--child", loader, str(path), size, "bfloat16"]
        out = subprocess.run(child, capture_output=True, text=True, check=True)
        figures["bf16" if loader == "lean" else "int8"] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n{size}: loading in a fresh process (peak RSS: VmHWM)")
    print(f"{'weights':<9}{'model':>9}{'peak RSS':>10}{'peak/model':>12}{'imports':>9}{'(peak-imports)/model':>22}")
    for name, f in figures.items():
        grown = (f["peak_gb"] - f["before_gb"]) / f["model_gb"]
        print(
            f"{name:<9}{f['model_gb']:>7.2f}GB{f['peak_gb']:>8.2f}GB{f['peak_gb'] / f['model_gb']:>11.2f}x"
            f"{f['before_gb']:>7.2f}GB{grown:>21.2f}x"
        )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,csm-1b", help="comma-separated: tiny, csm-1b")
    parser.add_argument("--frames", type=int, default=256, help="teacher-forced frames (at most 2048)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where checkpoints are written")
    parser.add_argument("--parts", default="fidelity,rss", help="comma-separated: fidelity, rss (csm-1b only)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if not 2 <= args.frames <= 2048:
        parser.error("--frames must be within 2..2048")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    results = {}
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="misotts-quantization-") as tmp:
            path, config = checkpoint(size, Path(tmp))
            results[size] = {}
            if "fidelity" in args.parts:
                print(f"{size}: {args.frames} frames, teacher-forced", flush=True)
                results[size]["errors"] = report(size, fidelity(path, config, args.frames))
            if "rss" in args.parts and size != "tiny":
                results[size]["rss"] = peak_rss(path, size)
    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

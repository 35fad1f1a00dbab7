"""The frame step against the hardware limit, on this machine, this tree next to a baseline revision.

Three parts (``--parts``), each run for the current tree and, with ``--baseline REV``, for that git
revision's package in a subprocess (same script, same machine, same run):

- ``ops``: ATen ops dispatched by one frame step at the MisoTTS 8B layout (llama-8B backbone,
  llama-300M depth decoder), counted on the ``meta`` device (no weights allocated), batch 1 and 32;
  "kernels" excludes views and other metadata-only ops (what an eager GPU run would launch).
- ``csm``: ms per frame step of a random CSM-1B-size model (1.55 B parameters, built here) at
  batch 1 and 8, fp32 and bf16, next to the memory-bandwidth floor: the bytes a step must read
  (weights + KV, bandwidth.py) over the best streaming-read rate measured in the same run with the
  same threads (the larger of a big fp32 ``sum`` and a big fp32 matrix-vector product).
- ``blas``: the batch-1 step is matrix-vector products (95% of it in ``aten::mm``); the read rate
  of each CSM-1B weight shape through ``F.linear`` (what the model runs) and with the matrix stored
  transposed (``x @ W.T`` from a contiguous copy, a different BLAS kernel), weighted by the bytes a
  frame reads of each shape, next to the floor's read rate. The transposed layout is
  not used: it sums in another order, so fp32 results would stop matching the reference bit for bit.
- ``attention``: frames/s of 8 streams on an attention-heavy flavor (a small backbone whose KV
  reads outweigh its weights at long context) with a short prompt (64 positions) vs ~1,900
  positions of context; and the same 8 streams in a 16-row step (8 padding rows).

    uv run python benchmarks/frame_step.py --baseline 691fe13 --json out/frame_step.json

Figures are medians of ``--steps`` timed steps after one warm-up step, torch threads as given
(default 1). On a busy 2-core machine other work skews them: the load average is printed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from misotts_agents.engine import step as step_module
from misotts_agents.model import bandwidth
from misotts_agents.model.config import CSM_1B, MISOTTS_8B, ModelConfig
from misotts_agents.model.sampling import SamplingState
from misotts_agents.model.transformer import MisoModel

K = 32
ATTENTION_HEAVY = ModelConfig(  # 16 layers x 8 KV heads x 64: 16 KB of KV per position (weights: 200 MB)
    backbone_flavor={"num_layers": 16, "num_heads": 16, "num_kv_heads": 8, "embed_dim": 1024, "intermediate_dim": 1024},
    decoder_flavor={"num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 128, "intermediate_dim": 256},
)
NO_KERNEL = {"_unsafe_view", "empty", "empty_strided", "empty_like", "lift_fresh", "sym_size", "sym_stride"}


# -- version-adaptive helpers (this script also runs against a baseline revision's package) ---------


def build_model(config: ModelConfig, device: str, dtype: torch.dtype, seed: int = 0) -> MisoModel:
    """Random N(0, 0.02) weights made in place, in ``dtype``, on ``device`` (``meta``: none at all)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = MisoModel(config)
    finally:
        torch.set_default_dtype(previous)
    if device != "meta":
        model.to_empty(device=device)
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".scale"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator)
        model.init_buffers()
    if hasattr(model, "fuse_weights"):
        model.fuse_weights()
    return model.eval().requires_grad_(False)


def make_stepper(model: MisoModel, max_batch: int, buckets: bool = False):
    params = inspect.signature(step_module.FrameStepper).parameters
    if "scratch_row" in params:  # before issue 14: a separate scratch cache row pads the batch
        model.setup_caches(max_batch + 1)
        return step_module.FrameStepper(model, max_batch, scratch_row=max_batch, cuda_graphs=False, buckets=buckets)
    model.setup_caches(max_batch)
    return step_module.FrameStepper(model, max_batch, cuda_graphs=False, compile=False, buckets=buckets)


def step_once(stepper, slots: list[int], positions: list[int], device: str, topk: int = 50) -> torch.Tensor:
    n = len(slots)
    rows = torch.tensor(slots, device=device)
    tokens = torch.zeros(n, 1, K + 1, dtype=torch.long, device=device)
    tokens[:, 0, :K] = 7
    mask = torch.ones(n, 1, K + 1, dtype=torch.bool, device=device)
    mask[:, 0, K] = False
    pos = torch.tensor(positions, device=device)[:, None]
    sampling = SamplingState.empty(n, device)
    sampling.topk.fill_(topk)
    if "host" in inspect.signature(stepper.__call__).parameters:  # the host's copy: no device reads
        return stepper(rows, tokens, mask, pos, sampling, step_module.HostRows(slots, positions, topk))
    return stepper(rows, tokens, mask, pos, sampling)


def timed_steps(stepper, slots: list[int], positions: list[int], steps: int) -> float:
    """Median ms of ``steps`` steps after one warm-up step."""
    with torch.inference_mode():
        step_once(stepper, slots, positions, "cpu")
        times = []
        for _ in range(steps):
            began = time.perf_counter()
            step_once(stepper, slots, positions, "cpu")
            times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


# -- parts ------------------------------------------------------------------------------------------


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if not (func.is_view or name in NO_KERNEL):
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def part_ops() -> dict:
    out = {}
    for batch in (1, 32):
        model = build_model(MISOTTS_8B, "meta", torch.bfloat16)
        stepper = make_stepper(model, batch)
        with torch.inference_mode(), OpCounter() as counter:
            step_once(stepper, list(range(batch)), [300] * batch, "meta")
        out[f"batch{batch}"] = {
            "aten_ops": sum(counter.ops.values()),
            "kernels": counter.kernels,
            "top": counter.ops.most_common(12),
        }
    return out


def read_rates_gbs(gigabytes: float = 1.0) -> dict[str, float]:
    """This machine's best read rates at the current thread count (GB/s): a plain streaming read
    (``sum``) and the BLAS matrix-vector product the batch-1 step is made of (``mv``)."""
    n = int(gigabytes * 1e9 / 4) // 4096 * 4096
    buf = torch.randn(n)
    rates = {}
    for name, fn in (("sum", buf.sum), ("mv", lambda: torch.mv(buf.view(-1, 4096), torch.ones(4096)))):
        best = 0.0
        for _ in range(3):
            began = time.perf_counter()
            fn()
            best = max(best, n * 4 / (time.perf_counter() - began) / 1e9)
        rates[name] = best
    return rates


def part_csm(steps: int, dtypes: list[str]) -> dict:
    rates = read_rates_gbs()
    gbs = max(rates.values())  # the floor: the fastest read this machine showed
    out = {"read_gbs": gbs, "rates_gbs": rates, "runs": []}
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for batch in (1, 8):
            model = build_model(CSM_1B, "cpu", dtype)
            stepper = make_stepper(model, batch)
            context = 64
            ms = timed_steps(stepper, list(range(batch)), [context] * batch, steps)
            nbytes = bandwidth.bytes_per_frame(CSM_1B, dtype.itemsize) + (
                bandwidth.kv_bytes_per_frame(CSM_1B, dtype.itemsize, batch, context + 1)
                if hasattr(bandwidth, "kv_bytes_per_frame")
                else 0
            )
            floor = nbytes / (gbs * 1e9) * 1e3
            blas = nbytes / (rates["mv"] * 1e9) * 1e3  # the same bytes at the matrix-vector product's rate
            run = {"dtype": dtype_name, "batch": batch, "ms": ms, "floor_ms": floor, "ratio": ms / floor}
            out["runs"].append({**run, "mv_floor_ms": blas})
            print(
                f"    csm {dtype_name:8} batch {batch}: {ms:8.1f} ms/step, floor {floor:7.1f} ms, {ms / floor:.2f}x"
                f" ({ms / blas:.2f}x the bytes at fp32 mv's rate)"
            )
            del stepper, model
    return out


def blas_shapes(config: ModelConfig) -> dict[tuple[int, int], int]:
    """Each (out, in) weight shape of one batch-1 frame step and how many times a frame reads it:
    the backbone's matrices once, the depth decoder's 31 times (one per codebook after the first)."""
    reads: Counter[tuple[int, int]] = Counter()
    for flavor, times in ((config.backbone, 1), (config.decoder, K - 1)):
        hd = flavor.embed_dim // flavor.num_heads
        qkv = (flavor.num_heads + 2 * flavor.num_kv_heads) * hd
        for shape in (
            (qkv, flavor.embed_dim),
            (flavor.embed_dim, flavor.num_heads * hd),
            (2 * flavor.intermediate_dim, flavor.embed_dim),
            (flavor.embed_dim, flavor.intermediate_dim),
        ):
            reads[shape] += flavor.num_layers * times
    return dict(reads)


def part_blas(steps: int) -> dict:
    def timed(fn) -> float:
        began = time.perf_counter()
        fn()
        return time.perf_counter() - began

    def rate(fn, nbytes: int) -> float:
        fn()
        return nbytes / min(timed(fn) for _ in range(max(steps, 3))) / 1e9

    out: dict = {"shapes": []}
    weighted: dict[str, float] = {"linear": 0.0, "transposed": 0.0}
    shapes = blas_shapes(CSM_1B)
    for (rows, cols), times in shapes.items():
        w, x = torch.randn(rows, cols), torch.randn(1, cols)
        stored_t = w.t().contiguous()
        nbytes = w.numel() * 4
        rates = {
            "linear": rate(lambda w=w, x=x: torch.nn.functional.linear(x, w), nbytes),
            "transposed": rate(lambda t=stored_t, x=x: x @ t, nbytes),
            "sum": rate(w.sum, nbytes),
        }
        out["shapes"].append({"shape": [rows, cols], "reads_per_frame": times, "gbs": rates})
        for name in weighted:
            weighted[name] += nbytes * times / rates[name]  # seconds x 1e9 per frame at this rate
        print(
            f"    ({rows:5} x {cols:5}) x{times:3} per frame: F.linear {rates['linear']:5.1f}, "
            f"stored transposed {rates['transposed']:5.1f}, sum {rates['sum']:5.1f} GB/s"
        )
        del w, stored_t
    total = sum(4 * r * c * t for (r, c), t in shapes.items())
    out["per_frame_gbs"] = {name: total / seconds for name, seconds in weighted.items()}
    rates = out["per_frame_gbs"]
    out["floor_read_gbs"] = floor_gbs = max(read_rates_gbs().values())  # the csm part's floor rate
    out["linear_bound_x_floor"] = floor_gbs / rates["linear"]
    print(
        f"    a frame's matrices, bytes-weighted: F.linear {rates['linear']:.1f} GB/s, stored transposed "
        f"{rates['transposed']:.1f} GB/s; the floor reads at {floor_gbs:.1f} GB/s, so at F.linear's rates a "
        f"batch-1 step takes at least {out['linear_bound_x_floor']:.2f}x the floor (a lower bound: the small "
        "matrices were measured warm in cache)"
    )
    return out


def part_attention(steps: int) -> dict:
    out = {}
    for label, max_batch, buckets, context in (
        ("short", 8, False, 64),
        ("long", 8, False, 1900),
        ("long, 16-row step (8 padding)", 16, False, 1900),
        ("long, 16 rows, batch buckets", 16, True, 1900),
    ):
        model = build_model(ATTENTION_HEAVY, "cpu", torch.float32)
        stepper = make_stepper(model, max_batch, buckets)
        ms = timed_steps(stepper, list(range(8)), [context] * 8, steps)
        out[label] = {"ms": ms, "frames_per_s": 8 / ms * 1000}
        print(f"    attention-heavy, 8 streams, {label:32}: {ms:7.1f} ms/step, {8 / ms * 1000:6.1f} frames/s")
        del stepper, model
    return out


def worker(parts: list[str], steps: int, dtypes: list[str]) -> dict:
    results = {}
    if "ops" in parts:
        results["ops"] = part_ops()
        for batch, r in results["ops"].items():
            print(f"    8B layout, {batch}: {r['aten_ops']} ATen ops, {r['kernels']} compute/copy ops")
    if "csm" in parts:
        results["csm"] = part_csm(steps, dtypes)
    if "blas" in parts:
        results["blas"] = part_blas(steps)
    if "attention" in parts:
        results["attention"] = part_attention(steps)
    return results


# -- driver -----------------------------------------------------------------------------------------


def run_baseline(rev: str, argv: list[str]) -> dict:
    """This script against ``rev``'s package, exported from git into a temporary directory."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", rev, "misotts_agents"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        out = Path(tmp) / "result.json"
        env = {**os.environ, "PYTHONPATH": tmp}
        subprocess.run([sys.executable, __file__, *argv, "--worker-json", str(out)], check=True, env=env)
        return json.loads(out.read_text())


def print_comparison(current: dict, baseline: dict | None, rev: str | None) -> None:
    def row(label: str, now: float, before: float | None, fmt: str) -> None:
        then = "" if before is None else format(before, fmt)
        change = "" if before is None else f"{now / before:6.2f}x"
        print(f"  {label:54} {format(now, fmt):>12} {then:>12} {change:>8}")

    print()
    print(f"  {'':54} {'this tree':>12} {('baseline ' + rev) if rev else '':>12} {'ratio':>8}")
    if "ops" in current:
        for batch, r in current["ops"].items():
            b = baseline["ops"][batch] if baseline else None
            row(f"8B layout ATen ops per frame, {batch}", r["aten_ops"], b and b["aten_ops"], "d")
            row(f"8B layout compute/copy ops per frame, {batch}", r["kernels"], b and b["kernels"], "d")
    if "csm" in current:
        rates = current["csm"].get("rates_gbs", {})
        print(f"  read rates measured (this tree's run, GB/s): {', '.join(f'{k} {v:.1f}' for k, v in rates.items())}")
        for i, r in enumerate(current["csm"]["runs"]):
            b = baseline["csm"]["runs"][i] if baseline else None
            row(f"CSM-1B {r['dtype']} batch {r['batch']}: ms per step", r["ms"], b and b["ms"], ".1f")
            # both against this run's floor (the baseline's bandwidth.py counted no KV bytes)
            row(
                f"CSM-1B {r['dtype']} batch {r['batch']}: x the floor", r["ratio"], b and b["ms"] / r["floor_ms"], ".2f"
            )
    if "attention" in current:
        for label, r in current["attention"].items():
            b = baseline["attention"].get(label) if baseline else None
            row(f"attention-heavy 8 streams {label}: frames/s", r["frames_per_s"], b and b["frames_per_s"], ".1f")
        a = current["attention"]
        print(f"  short / long frames/s (this tree): {a['short']['frames_per_s'] / a['long']['frames_per_s']:.2f}")
        if baseline:
            ba = baseline["attention"]
            print(
                f"  short / long frames/s (baseline):  {ba['short']['frames_per_s'] / ba['long']['frames_per_s']:.2f}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="ops,csm,blas,attention", help="comma-separated: ops, csm, blas, attention")
    parser.add_argument("--baseline", default=None, help="git revision to compare with (e.g. 691fe13)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="dtypes of the CSM-1B-size runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--worker-json", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    dtypes = args.dtypes.split(",")
    if args.worker_json is not None:  # a baseline run: figures only
        args.worker_json.write_text(json.dumps(worker(parts, args.steps, dtypes)))
        return 0
    started = time.perf_counter()
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("this tree:")
    current = worker(parts, args.steps, dtypes)
    baseline = None
    if args.baseline:
        print(f"baseline {args.baseline}:")
        forwarded = ["--parts", args.parts, "--steps", str(args.steps), "--dtypes", args.dtypes]
        baseline = run_baseline(args.baseline, [*forwarded, "--threads", str(args.threads)])
    print_comparison(current, baseline, args.baseline)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"total time: {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"command": sys.argv, "baseline_rev": args.baseline, "current": current, "baseline": baseline}
        args.json.write_text(json.dumps(record, indent=2))
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`misotts-agents bench`: N streams batched together vs the same N requests run one at a time.

For each concurrency level N (default 1, 2, 4, 8, 16) the script submits N requests of the same
length (default 25 frames = 2 s of audio, a different seed each) to one shared engine in each of
the ``--modes`` (default: the first two):

- batched: all N streams are created at once and consumed concurrently (one asyncio task per
  stream, ``async for``), so the engine's scheduler advances them together, one frame per step;
- sequential: the same N requests on the same engine, one after another, each alone;
- no-overlap (only when asked, ``--modes batched,no-overlap``): batched, with the engine's step
  loop not overlapped (each step read before the next is queued; the CPU default), to measure what
  overlapping the host's work with the device's is worth on a GPU, in the same run,

and measures, per mode:

- aggregate frames/s: total frames of all N streams / wall time from submission to the last chunk;
- per-stream real-time factor (median): the stream's own ``stats.real_time_factor``, i.e. its
  elapsed seconds per second of audio (in sequential mode this does not include waiting in line);
- time to first audio, p50 and p95 across the N streams, measured by this script from the moment
  all N requests were submitted, in both modes. For the sequential queue this includes waiting for
  the requests ahead: its p95 is what the user who arrived last would see.

One warm-up run (batched, at the highest level) comes first. Watermarking is off unless
``--watermark`` is given (then the model directory's ``silentcipher/`` is used: for the tiny
checkpoint a random-weight SilentCipher with the real one's compute). The table goes to stdout and a
two-panel plot (aggregate frames/s and TTFA vs concurrency) to ``--plot``.

It also prints the memory-bandwidth floor of one frame step (bandwidth.py): the weights and KV a
step must read divided by the GPU's peak bandwidth (``--bandwidth-gbs`` elsewhere), next to the
measured time per step; on CUDA the kernels one frame step launches (profiled). Everything also
goes to ``--json`` (default: the plot's path with ``.json``).

``--random-weights llama-8B`` needs no checkpoint: the 8B layout's weights are drawn on the device
in seconds (testing/random_weights.py), with a full-size random Mimi and no watermark, for
measuring a GPU the moment it is available; ``tiny`` or a JSON config does the same on a CPU.

    uv run misotts-agents bench                      # tiny random checkpoint, CPU
    uv run misotts-agents bench --levels 1,4,16 --frames 50 --watermark
    uv run misotts-agents bench --model MisoLabs/MisoTTS --levels 1,2,4,8,16,32     # on your GPU
    misotts-agents bench --random-weights llama-8B --levels 1,8,32,64,128 --modes batched,no-overlap --batch-buckets
    misotts-agents bench --random-weights llama-8B --weights int8 --levels 1,8,32,64,128 --modes batched --batch-buckets
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from misotts_agents.audio import FRAME_S
from misotts_agents.engine.miso_engine import MisoEngine, default_device
from misotts_agents.engine.request import SynthesisRequest
from misotts_agents.model.bandwidth import (
    dtype_bytes,
    floor_ms,
    gpu_bandwidth_gbs,
    kv_bytes_per_frame,
    weight_bytes_per_frame,
)
from misotts_agents.model.config import WEIGHT_FORMATS
from misotts_agents.model.footprint import device_memory
from misotts_agents.testing.random_weights import random_engine
from misotts_agents.testing.tiny import make_tiny

TEXT = "Thanks for calling. Let me look that up for you right away."
NOTES = """\
agg frames/s: frames of all N streams / wall time from submission to the last chunk.
RTF p50:      median of each stream's own stats.real_time_factor (wall s per audio s, from that stream's
              submission to its end; a sequential stream is submitted when the one before it ends).
TTFA:         measured by this script from the moment all N requests were submitted, in every mode, so it
              includes waiting in line (sequential p95 = roughly what the user who arrived last sees).
speed-up:     batched / sequential agg frames/s.  frames/step: frames / engine steps during the run.
no-overlap:   batched, each step read before the next is queued (the CPU default; on CUDA, overlap's baseline)."""


@dataclass
class StreamResult:
    frames: int
    first_audio_s: float  # from the moment all N requests were submitted
    rtf: float | None  # the stream's own stats.real_time_factor
    stop_reason: str
    prompt_frames: int


@dataclass
class RunResult:
    level: int
    mode: str  # "batched" | "sequential" | "no-overlap"
    wall_s: float
    streams: list[StreamResult]
    engine_steps: int  # engine steps taken during the run (from engine.metrics())

    @property
    def frames(self) -> int:
        return sum(s.frames for s in self.streams)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.wall_s

    @property
    def rtf_p50(self) -> float:
        return statistics.median(s.rtf for s in self.streams if s.rtf is not None)

    def ttfa(self, q: float) -> float:
        return float(np.percentile([s.first_audio_s for s in self.streams], q))

    @property
    def frames_per_step(self) -> float:
        return self.frames / self.engine_steps if self.engine_steps else float("nan")


def requests_for(level: int, frames: int, base_seed: int) -> list[SynthesisRequest]:
    return [SynthesisRequest(TEXT, seed=base_seed + i, max_audio_ms=FRAME_S * 1000 * frames) for i in range(level)]


async def consume(stream, submitted: float, bar: tqdm | None = None) -> StreamResult:
    """Pull every chunk of one stream; note when its first audio arrived (since submission)."""
    first = None
    frames = 0
    async for chunk in stream:
        if first is None:
            first = time.perf_counter() - submitted
        frames += chunk.frames
        if bar is not None:
            bar.update(chunk.frames)
    stats = stream.stats
    first_s = first if first is not None else float("nan")
    return StreamResult(frames, first_s, stats.real_time_factor, stats.stop_reason, stats.prompt_frames or 0)


async def run_batched(
    engine: MisoEngine, requests: list[SynthesisRequest], bar: tqdm | None = None
) -> tuple[float, list[StreamResult]]:
    submitted = time.perf_counter()
    streams = [engine.stream(r) for r in requests]
    results = await asyncio.gather(*(consume(s, submitted, bar) for s in streams))
    return time.perf_counter() - submitted, list(results)


async def run_sequential(
    engine: MisoEngine, requests: list[SynthesisRequest], bar: tqdm | None = None
) -> tuple[float, list[StreamResult]]:
    submitted = time.perf_counter()  # all N are "submitted" now; each waits for the ones ahead of it
    results = [await consume(engine.stream(r), submitted, bar) for r in requests]
    return time.perf_counter() - submitted, results


def run(engine: MisoEngine, mode: str, level: int, frames: int, base_seed: int, bar: tqdm | None = None) -> RunResult:
    requests = requests_for(level, frames, base_seed)
    steps_before = engine.metrics().steps
    runner = run_sequential if mode == "sequential" else run_batched
    if bar is not None:
        bar.set_description(f"{mode} N={level}")
    overlap = engine.overlap
    engine.overlap = overlap and mode != "no-overlap"
    try:
        wall_s, streams = asyncio.run(runner(engine, requests, bar))
    finally:
        engine.overlap = overlap
    check_idle(engine, f"{mode} N={level}")
    for i, s in enumerate(streams):
        if s.frames != frames:
            print(f"  note: {mode} N={level} stream {i} gave {s.frames} frames ({s.stop_reason}), not {frames}")
    return RunResult(level, mode, wall_s, streams, engine.metrics().steps - steps_before)


def check_idle(engine: MisoEngine, label: str, wait_s: float = 1.0) -> None:
    """After a run every stream has ended: the engine should have no active or queued request left."""
    deadline = time.perf_counter() + wait_s
    metrics = engine.metrics()
    while (metrics.active or metrics.queued) and time.perf_counter() < deadline:
        time.sleep(0.01)
        metrics = engine.metrics()
    if metrics.active or metrics.queued:
        print(f"  WARNING after {label}: engine still has active={metrics.active} queued={metrics.queued}")


def format_load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def print_table(results: list[RunResult]) -> None:
    header = (
        f"{'N':>3}  {'mode':<10}{'agg frames/s':>13}{'RTF p50':>9}{'TTFA p50':>10}{'TTFA p95':>10}"
        f"{'speed-up':>10}{'frames/step':>13}"
    )
    print(header)
    print("-" * len(header))
    by_key = {(r.level, r.mode): r for r in results}
    for r in results:
        speedup = ""
        if r.mode == "batched" and (r.level, "sequential") in by_key:
            speedup = f"{r.frames_per_s / by_key[(r.level, 'sequential')].frames_per_s:.2f}x"
        print(
            f"{r.level:>3}  {r.mode:<10}{r.frames_per_s:>13.1f}{r.rtf_p50:>9.2f}"
            f"{r.ttfa(50) * 1000:>8.0f}ms{r.ttfa(95) * 1000:>8.0f}ms{speedup:>10}{r.frames_per_step:>13.2f}"
        )


def print_floor(engine: MisoEngine, results: list[RunResult], bandwidth_gbs: float | None) -> dict:
    """The bandwidth floor of each batched run's steps (weights + its rows' KV at their mean
    context) next to the measured ms per step (wall time / engine steps); returned for the JSON."""
    known, name = gpu_bandwidth_gbs(engine.device)
    gbs = bandwidth_gbs or known
    config, nbytes = engine.model.config, dtype_bytes(engine.model.dtype)
    eight_bit = 1 if engine.model.weights != "bf16" else None  # 8-bit linear layers (model/quantized.py)
    weights = weight_bytes_per_frame(config, nbytes, eight_bit)
    print(f"weights read per frame step: {weights / 1e9:.3f} GB ({engine.model.dtype}, {engine.model.weights})")
    print(f"device: {name}; memory: {device_memory(engine.model)}")
    out: dict = {"device": name, "bandwidth_gbs": gbs, "weight_bytes": weights, "levels": {}, "levels_no_overlap": {}}
    out["memory"] = device_memory(engine.model)
    if gbs is None:
        print("bandwidth floor: unknown memory bandwidth for this device (pass --bandwidth-gbs)")
    else:
        floor = floor_ms(config, nbytes, gbs, linear_bytes=eight_bit)
        print(
            f"bandwidth floor at {gbs:.0f} GB/s, weights only: {floor:.2f} ms per step "
            f"= RTF {floor / 80:.3f} per stream"
        )
    for r in results:
        if r.mode == "sequential":
            continue
        step_ms = r.wall_s / r.engine_steps * 1000 if r.engine_steps else float("nan")
        context = round(statistics.mean(s.prompt_frames + s.frames / 2 for s in r.streams))
        kv = kv_bytes_per_frame(config, nbytes, r.level, context)
        level = {"ms_per_step": step_ms, "context": context, "kv_bytes": kv}
        if gbs is not None:
            floor = floor_ms(config, nbytes, gbs, r.level, context, eight_bit)
            level.update(floor_ms=floor, x_floor=step_ms / floor)
            print(
                f"  N={r.level:<3} {r.mode:<10} measured {step_ms:7.2f} ms per step; floor {floor:6.2f} ms "
                f"(weights + KV of {r.level} rows at ~{context} positions): {step_ms / floor:5.2f}x"
            )
        out["levels" if r.mode == "batched" else "levels_no_overlap"][r.level] = level
    return out


def count_kernels(engine: MisoEngine) -> dict | None:
    """CUDA kernels (and copies) one frame step launches, profiled: the captured graph's replay and
    the same step run without its graph. None off CUDA."""
    if engine.device.type != "cuda":
        return None
    from torch.profiler import DeviceType, ProfilerActivity, profile

    stepper = engine._scheduler.executor.stepper
    shape = stepper.shape_for([0], [64], 50)

    def kernels(fn) -> int:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = prof.events()  # filled when profiling stops, at the end of the with block
        if events is None:
            raise RuntimeError("the profiler recorded no events")
        return sum(1 for e in events if e.device_type == DeviceType.CUDA)

    with torch.inference_mode():
        out = {"shape": str(shape), "eager": kernels(lambda: stepper._run(shape))}
        captured = stepper.graphs.get(shape)
        if captured is not None:
            out["graph_replay"] = kernels(captured.graph.replay)
    print(f"kernels per frame step ({shape}): {out}")
    return out


def build_engine(args: argparse.Namespace, max_batch: int, tmp: Path) -> MisoEngine:
    options = {
        "max_batch": max_batch,
        "batch_buckets": args.batch_buckets,
        "compile": False if args.no_compile else None,
    }
    if args.random_weights:
        device = torch.device(args.device) if args.device else default_device()
        dtype = (
            getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        )
        if args.watermark:
            raise SystemExit("--watermark needs a model directory (random weights come without SilentCipher)")
        return random_engine(
            args.random_weights, device=device, dtype=dtype, tokenizer=args.tokenizer, weights=args.weights, **options
        )
    model = args.model or make_tiny(tmp / "tiny")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return MisoEngine.load(
        model,
        device=args.device,
        dtype=dtype,
        watermark=args.watermark,
        progress=True,  # the weights' loading bar (stderr)
        weights=args.weights,
        **options,
    )


def plot(results: list[RunResult], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return
    matplotlib.use("Agg")  # headless; must come before pyplot is imported
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_rate, ax_ttfa) = plt.subplots(1, 2, figsize=(11, 4.5))
    styles = {"batched": ("tab:blue", "o"), "sequential": ("tab:orange", "s")}
    for mode, (color, marker) in styles.items():
        rows = [r for r in results if r.mode == mode]
        levels = [r.level for r in rows]
        ax_rate.plot(levels, [r.frames_per_s for r in rows], marker=marker, color=color, label=mode)
        ax_ttfa.plot(levels, [r.ttfa(50) * 1000 for r in rows], marker=marker, color=color, label=f"{mode} p50")
        ax_ttfa.plot(  # hollow, larger markers: visible even where p95 equals p50
            levels,
            [r.ttfa(95) * 1000 for r in rows],
            marker=marker,
            markersize=10,
            markerfacecolor="none",
            color=color,
            linestyle="--",
            label=f"{mode} p95",
        )
    levels = sorted({r.level for r in results})
    for ax in (ax_rate, ax_ttfa):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(n) for n in levels])
        ax.set_xlabel("concurrent streams N")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax_rate.set_ylim(bottom=0)
    ax_rate.set_ylabel("aggregate frames/s (80 ms frames)")
    ax_rate.set_title("throughput")
    ax_ttfa.set_ylabel("time to first audio (ms, from submission of all N)")
    ax_ttfa.set_yscale("log")
    ax_ttfa.yaxis.set_major_formatter(ScalarFormatter())
    ax_ttfa.set_title("time to first audio")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="misotts-agents bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model dir or Hub repo (default: a fresh tiny random checkpoint)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--levels", default="1,2,4,8,16", help="comma-separated concurrency levels (default: 1,2,4,8,16)"
    )
    parser.add_argument("--frames", type=int, default=25, help="frames per stream, 80 ms each (default 25 = 2 s)")
    parser.add_argument("--max-batch", type=int, default=None, help="engine max_batch (default: the highest level)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the first stream; stream i gets seed+i")
    parser.add_argument(
        "--watermark", action="store_true", help="watermark the audio (SilentCipher from the model dir's silentcipher/)"
    )
    parser.add_argument("--plot", type=Path, default=Path("out/concurrency.png"), help="PNG to write")
    parser.add_argument(
        "--batch-buckets",
        action="store_true",
        help="power-of-two step shapes instead of always max_batch rows (less compute at low load)",
    )
    parser.add_argument(
        "--bandwidth-gbs", type=float, default=None, help="GPU memory bandwidth for the floor (default: known GPUs)"
    )
    parser.add_argument(
        "--random-weights",
        metavar="LAYOUT",
        help="no checkpoint: random weights made on the device for llama-8B (MisoTTS 8B), llama-1B (CSM-1B), "
        "tiny, a config.json path or a JSON config",
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--weights", choices=WEIGHT_FORMATS, default="bf16", help="linear layers (default: bf16)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json for --random-weights (default: the bundled one)")
    parser.add_argument(
        "--modes",
        default="batched,sequential",
        help="comma-separated: batched, sequential, no-overlap (batched, steps not overlapped); default: the first two",
    )
    parser.add_argument("--no-compile", action="store_true", help="do not torch.compile the step (default: on CUDA)")
    parser.add_argument("--json", type=Path, default=None, help="figures as JSON (default: --plot with .json)")
    args = parser.parse_args(argv)
    levels = sorted({int(n) for n in args.levels.split(",")})
    if not levels or levels[0] < 1 or args.frames < 1:
        parser.error("levels and frames must be positive integers")
    modes = [m for m in ("batched", "sequential", "no-overlap") if m in args.modes.split(",")]
    if not modes or set(args.modes.split(",")) - set(modes):
        parser.error("--modes takes batched, sequential and no-overlap, comma-separated")
    if args.model and args.random_weights:
        parser.error("--model and --random-weights exclude each other")

    started = time.perf_counter()
    tmp = tempfile.TemporaryDirectory()
    max_batch = args.max_batch or levels[-1]
    engine = build_engine(args, max_batch, Path(tmp.name))
    load_s = time.perf_counter() - started
    model_name = args.model or (f"random {args.random_weights}" if args.random_weights else "tiny random checkpoint")
    try:
        device, dtype = str(engine.device), str(engine.model.dtype).removeprefix("torch.")
        print(f"command: {shlex.join([sys.executable, *sys.argv])}")
        print(f"engine ready in {load_s:.1f} s (weights, Mimi, compile and CUDA graph capture where on)")
        print(
            f"model={model_name} device={device} dtype={dtype} "
            f"torch threads={torch.get_num_threads()} max_batch={max_batch} watermark={args.watermark} "
            f"batch_buckets={args.batch_buckets} overlap={engine.overlap}"
        )
        print(f"load average at start (1/5/15 min): {format_load()} on {os.cpu_count()} CPUs")
        print(f"each stream: {args.frames} frames = {args.frames * FRAME_S:.2f} s of audio; levels={levels}")

        # A progress bar of frames generated, on stderr when it is a terminal (the table stays on stdout).
        total = args.frames * (levels[-1] + len(modes) * sum(levels))
        with tqdm(total=total, unit="frame", file=sys.stderr, disable=None, leave=False) as bar:
            print("warm-up (one-off allocations, CUDA graph capture)...", flush=True)
            run(engine, "batched", levels[-1], args.frames, args.seed, bar)
            results = []
            for level in levels:
                for mode in modes:
                    result = run(engine, mode, level, args.frames, args.seed, bar)
                    results.append(result)
                    bar.write(f"  N={level:<3} {mode:<10} {result.wall_s:6.2f} s wall", file=sys.stdout)
        print()
        print_table(results)
        print()
        print(NOTES)
        floor = print_floor(engine, results, args.bandwidth_gbs)
        kernels = count_kernels(engine)
        metrics = engine.metrics()
        print(f"engine metrics at the end: {metrics}")
        plot(
            results,
            args.plot,
            f"misotts-agents concurrency: {model_name}, {device} {dtype}, {args.frames} frames/stream",
        )
        print(f"plot: {args.plot}")
        record = {
            "command": [sys.executable, *sys.argv],
            "model": model_name,
            "device": device,
            "device_name": floor["device"],
            "dtype": dtype,
            "weights": engine.model.weights,
            "torch": torch.__version__,
            "max_batch": max_batch,
            "batch_buckets": args.batch_buckets,
            "overlap": engine.overlap,
            "frames_per_stream": args.frames,
            "engine_ready_s": load_s,
            "results": [
                {
                    "level": r.level,
                    "mode": r.mode,
                    "wall_s": r.wall_s,
                    "frames_per_s": r.frames_per_s,
                    "rtf_p50": r.rtf_p50,
                    "ttfa_p50_s": r.ttfa(50),
                    "ttfa_p95_s": r.ttfa(95),
                    "frames_per_step": r.frames_per_step,
                    "engine_steps": r.engine_steps,
                }
                for r in results
            ],
            "floor": floor,
            "kernels_per_frame": kernels,
        }
        json_path = args.json or args.plot.with_suffix(".json")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"json: {json_path}")
        print(f"load average at end (1/5/15 min): {format_load()}  (other work on the machine skews all figures)")
        print(f"total benchmark time: {time.perf_counter() - started:.0f} s")
    finally:
        engine.close()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

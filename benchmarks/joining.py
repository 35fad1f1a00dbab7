"""Joining while others speak: the speaking streams' chunk gaps and the joiners' first audio, for
each prefill schedule, in one run.

For each schedule (``--schedules``, default ``0,128,256,512,auto``; 0 = whole prompts, the schedule
before chunked prefill) the script loads one engine on a small random checkpoint whose frame step
takes tens of milliseconds on a CPU (``--flavor``), then:

1. warms up: one joiner-sized request alone (its context audio is Mimi-encoded once and cached, as
   a conversation's earlier turns are), so the timed joiners only tokenise;
2. starts ``--speakers`` streams with a short prompt, one 80 ms frame per chunk, and waits until
   each has delivered ``WARM_CHUNKS`` chunks (steady state);
3. submits ``--joiners`` requests at once, each with ~``--context`` prompt positions (six earlier
   turns of text and audio, then the text to speak);
4. records every chunk's arrival at the speaking streams' consumers and each joiner's first chunk,
   until every joiner has spoken and ``AFTER_CHUNKS`` more steps have passed.

It prints, per schedule: the speaking streams' median chunk gap before the joins and after every
joiner has spoken (one frame step with the speakers only, and with the joiners speaking too: a step
of more active rows costs more on a CPU), their median and worst gap from the joins until every
joiner has spoken (the figure the schedule protects), worst / step-after (how many steps the worst
gap is), and the joiners' first audio p50 / p95 / max from their submission (what the schedule
trades against it). With ``--repeats`` it ends with the median of each figure over the runs.

    uv run python benchmarks/joining.py                          # CPU, one torch thread
    uv run python benchmarks/joining.py --speakers 8 --joiners 8 --schedules 0,auto --repeats 3
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from misotts_agents.engine.facade import MisoEngine
from misotts_agents.engine.prefill import parse_prefill_chunk
from misotts_agents.engine.request import ChunkSchedule, Segment, SynthesisRequest
from misotts_agents.model.config import ModelConfig
from misotts_agents.testing.tiny import make_tiny

# A frame step of tens of ms on the 2-core CPU with one torch thread at 8 rows (most of it the 31
# depth-decoder steps and sampling); prefill a fraction of a ms per position.
FLAVORS = {
    "bench": ModelConfig(
        backbone_flavor={"num_layers": 2, "num_heads": 8, "num_kv_heads": 2, "embed_dim": 256, "intermediate_dim": 768},
        decoder_flavor={"num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 128, "intermediate_dim": 384},
    ),
}
WARM_CHUNKS = 5  # chunks each speaking stream delivers before the joins
AFTER_CHUNKS = 10  # steps recorded after the last joiner's first audio (the step time at the new load)
ONE_FRAME = ChunkSchedule(first_frames=1, growth=1.0, max_frames=1)
TURNS = 6  # earlier turns in a joiner's context


def signal(seconds: float, seed: int) -> np.ndarray:
    """Speech-like test audio: a few harmonics with a wobble and some noise (any audio encodes)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 24_000)) / 24_000
    f0 = 120 + 80 * rng.random()
    wave = sum(np.sin(2 * np.pi * f0 * h * t) / h for h in (1, 2, 3)) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (0.15 * wave + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def joiner_context(positions: int) -> tuple[Segment, ...]:
    """~``positions`` prompt positions as TURNS earlier turns (each: ~12 text positions, its audio
    frames and one end frame)."""
    frames = max(1, positions // TURNS - 13)
    return tuple(
        Segment(i % 2, f"Earlier turn number {i}, said by speaker {i % 2}.", signal(frames * 0.08, i))
        for i in range(TURNS)
    )


@dataclass
class Consumer:
    """Reads one stream on its own thread and notes when each chunk arrived."""

    stream: object
    arrivals: list[float] = field(default_factory=list)
    error: BaseException | None = None

    def start(self) -> Consumer:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            for _ in self.stream:
                self.arrivals.append(time.perf_counter())
        except BaseException as exc:  # reported in the table, never silently
            self.error = exc


@dataclass
class Result:
    schedule: str
    gap_before_ms: float
    gap_after_ms: float
    gap_median_ms: float
    gap_worst_ms: float
    first_audio_ms: list[float]
    prompt_positions: int
    steps: int

    def first_audio(self, q: float) -> float:
        return float(np.percentile(self.first_audio_ms, q))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.002)


def run_schedule(model_dir: Path, schedule: str, args: argparse.Namespace) -> Result:
    engine = MisoEngine.load(
        model_dir,
        device="cpu",
        watermark=False,
        max_batch=args.speakers + args.joiners,
        prefill_chunk=parse_prefill_chunk(schedule),
        progress=False,
    )
    try:
        context = joiner_context(args.context)
        warm = engine.synthesize(SynthesisRequest("Warming up.", context=context, seed=0, max_audio_ms=160))
        speakers = [
            Consumer(
                engine.stream(
                    SynthesisRequest(
                        f"I am speaker {i} and I keep talking for a while.",
                        seed=10 + i,
                        chunks=ONE_FRAME,
                        max_audio_ms=80 * 1500,
                    )
                )
            ).start()
            for i in range(args.speakers)
        ]
        wait_for(lambda: all(len(c.arrivals) >= WARM_CHUNKS for c in speakers), 120, "the speakers to start")
        steps_before = engine.metrics().steps
        joined = time.perf_counter()
        joiners = [
            Consumer(
                engine.stream(
                    SynthesisRequest(
                        f"Reply number {i}: sure, let me check that for you.",
                        context=context,
                        seed=100 + i,
                        chunks=ONE_FRAME,
                        max_audio_ms=80 * 40,
                    )
                )
            ).start()
            for i in range(args.joiners)
        ]
        wait_for(lambda: all(c.arrivals or c.error for c in joiners), 600, "every joiner's first audio")
        last_first = max(c.arrivals[0] for c in joiners if c.arrivals)
        wait_for(
            lambda: all(len([t for t in c.arrivals if t > last_first]) >= AFTER_CHUNKS for c in speakers),
            120,
            "the steps after the joins",
        )
        steps = engine.metrics().steps - steps_before
        for c in speakers + joiners:
            c.stream.cancel()
        errors = [c.error for c in speakers + joiners if c.error is not None]
        if errors:
            raise RuntimeError(f"{len(errors)} streams failed, first: {errors[0]!r}")
    finally:
        engine.close()
    before, during, after = [], [], []
    for c in speakers:
        for a, b in itertools.pairwise(c.arrivals):
            if b <= joined:
                before.append(b - a)
            elif a <= last_first:  # every gap that overlaps the joining window
                during.append(b - a)
            else:
                after.append(b - a)
    return Result(
        schedule=schedule,
        gap_before_ms=1000 * statistics.median(before),
        gap_after_ms=1000 * statistics.median(after),
        gap_median_ms=1000 * statistics.median(during),
        gap_worst_ms=1000 * max(during),
        first_audio_ms=[1000 * (c.arrivals[0] - joined) for c in joiners],
        prompt_positions=warm.stats.prompt_frames,
        steps=steps,
    )


def describe(schedule: str) -> str:
    return "whole prompts (before)" if schedule in ("0", "none") else f"{schedule} positions/pass"


ROW = "{:<24}{:>8}{:>8}{:>9}{:>9}{:>12}{:>13}{:>8}{:>8}{:>7}"


def print_table(rows: list[tuple[str, ...]]) -> None:
    header = (
        ROW.format("schedule", "step", "step", "gap", "gap", "worst /", "first audio", "", "", "steps")
        + "\n"
        + ROW.format("", "before", "after", "median", "worst", "step after", "p50", "p95", "max", "")
    )
    print(header)
    print("-" * len(header.splitlines()[0]))
    for cells in rows:
        print(ROW.format(*cells))


def row(schedule: str, figures: list[Result]) -> tuple[str, ...]:
    """One table row: the median of each figure over ``figures`` (one run: its own figures)."""

    def med(f) -> float:
        return statistics.median(f(r) for r in figures)

    worst_steps = med(lambda r: r.gap_worst_ms / r.gap_after_ms)
    return (
        describe(schedule),
        f"{med(lambda r: r.gap_before_ms):.0f}ms",
        f"{med(lambda r: r.gap_after_ms):.0f}ms",
        f"{med(lambda r: r.gap_median_ms):.0f}ms",
        f"{med(lambda r: r.gap_worst_ms):.0f}ms",
        f"{worst_steps:.1f}x",
        f"{med(lambda r: r.first_audio(50)):.0f}ms",
        f"{med(lambda r: r.first_audio(95)):.0f}ms",
        f"{med(lambda r: max(r.first_audio_ms)):.0f}ms",
        f"{med(lambda r: r.steps):.0f}",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedules", default="0,128,256,512,auto", help="prefill_chunk values, comma separated")
    parser.add_argument("--speakers", type=int, default=4, help="streams speaking when the joiners arrive")
    parser.add_argument("--joiners", type=int, default=4, help="requests joining at once")
    parser.add_argument("--context", type=int, default=1800, help="prompt positions of each joiner (about)")
    parser.add_argument("--flavor", choices=sorted(FLAVORS), default="bench")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every schedule, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    for s in schedules:
        parse_prefill_chunk(s)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"flavor={args.flavor} speakers={args.speakers} joiners={args.joiners} context~{args.context} "
        f"torch threads={torch.get_num_threads()} load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        f"on {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(Path(tmp) / "model", config=FLAVORS[args.flavor])
        results = []
        for repeat in range(args.repeats):
            for schedule in schedules:
                result = run_schedule(model_dir, schedule, args)
                results.append(result)
                print(
                    f"  run {repeat + 1} {describe(schedule)}: joiner prompt {result.prompt_positions} positions, "
                    f"first audio {', '.join(f'{t:.0f}' for t in sorted(result.first_audio_ms))} ms",
                    flush=True,
                )
    print()
    print_table([row(r.schedule, [r]) for r in results])
    if args.repeats > 1:
        print(f"\nmedian of {args.repeats} runs:")
        print_table([row(s, [r for r in results if r.schedule == s]) for s in schedules])
    print()
    print("step before / after: the speaking streams' median gap between chunks before the joins and after every")
    print("  joiner spoke (one frame step, with fewer and with more rows active).")
    print("gap median / worst: their gaps from the joins until every joiner had its first audio;")
    print("  worst / step after: that worst gap in frame steps at the load the joins brought.")
    print("first audio: each joiner's first chunk, from the moment all joiners were submitted.")
    print(
        f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"total {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

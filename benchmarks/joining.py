"""Joining while others speak: what the speaking streams' listeners hear and when the joiners
first speak, for each prefill schedule, at two loads, in one run.

Schedules (``--schedules``, default ``0,share,auto``): ``0`` whole prompts (one per iteration, the
schedule before chunked prefill), ``share`` the chunked "auto" budget without playout deadlines
(a fixed share of each iteration, the schedule before deadlines), ``auto`` the default (that share,
stretched by the speaking streams' slack above the floor: engine/deadline.py), or a number of
positions per pass. Loads (``--loads``, default ``4+4,8+4,12+4``): speakers + joiners; on the 2-core
CPU the first runs well ahead of real time (a step of ~45 ms per 80 ms frame), the second nearer it
(~60 ms), the third at it (~80 ms: no schedule can prefill without a gap there, only trade gaps
against first audio). Every step runs ``max_batch`` = speakers + joiners rows. For each load and schedule
the script loads one engine on a small random checkpoint whose frame step takes tens of
milliseconds on a CPU (``--flavor``), then:

1. warms up: one joiner-sized request alone (its context audio is Mimi-encoded once and cached, as
   a conversation's earlier turns are), so the timed joiners only tokenise; then the same joiners
   one by one on the idle engine (their prefill's device time: the work in the bound below);
2. starts the speaking streams, one 80 ms frame per chunk, and waits until each has delivered
   ``--warm-s`` seconds of audio (mid-reply: as far ahead of its listener as the load lets a stream
   get in that time; at 6 s and twice real time, 3 s ahead);
3. submits the joiners at once, each with ~``--context`` prompt positions (six earlier turns of
   text and audio, then the text to speak);
4. records every chunk's arrival at the speaking streams' consumers and each joiner's first chunk,
   until every joiner has spoken and ``AFTER_CHUNKS`` more steps have passed.

It prints, per load and schedule: the frame step before the joins and after (the speakers' median
chunk gap), the speakers' worst gap from the joins until every joiner has spoken and its ratio to
the step after, the **silence** a real-time listener of each speaking stream hears in that window
(playback from its first chunk, no extra buffer: the most any one listener heard), and the joiners'
first audio p50 / max from their submission; then whether each schedule meets the goal (no
silence, last joiner within 1.5x of whole prompts).

It also prints the **gap-free bound** of each run: the soonest any schedule could have given the
last joiner its first audio without a speaker's listener running dry, from that run's own figures:
the speakers' least audio in hand when the joins came, their frame step, and the joiners' prefill
work (the device time of their passes when each came alone to the idle engine, in the warm-up).
That work must come out of the audio in hand or out of each frame's spare time (``80 ms - step``),
and the last joiner's first frame takes a step. It is optimistic (the step keeps its time before
the joins, prefill costs no more than on the idle engine, tokenising is free, the new speakers' own
listeners are not protected), so where even the bound is over 1.5x of whole prompts, no schedule
can meet the goal at that load on that device.

    uv run python benchmarks/joining.py                          # CPU, one torch thread
    uv run python benchmarks/joining.py --loads 4+4 --schedules 0,auto --repeats 3
    python benchmarks/joining.py --device cuda --random-weights llama-8B --loads 8+4,112+16 --schedules 0,auto
"""

from __future__ import annotations

import argparse
import itertools
import math
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

from misotts_agents.audio import FRAME_S
from misotts_agents.engine.miso_engine import MisoEngine
from misotts_agents.engine.prefill import parse_prefill_chunk
from misotts_agents.engine.request import ChunkSchedule, Segment, SynthesisRequest
from misotts_agents.engine.stream import SpeechStream
from misotts_agents.model.config import ModelConfig
from misotts_agents.testing.random_weights import random_engine
from misotts_agents.testing.tiny import make_tiny

# A frame step of tens of ms on the 2-core CPU with one torch thread at 8 rows (most of it the 31
# depth-decoder steps and sampling); prefill a fraction of a ms per position.
FLAVORS = {
    "bench": ModelConfig(
        backbone_flavor={"num_layers": 2, "num_heads": 8, "num_kv_heads": 2, "embed_dim": 256, "intermediate_dim": 768},
        decoder_flavor={"num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 128, "intermediate_dim": 384},
    ),
}
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

    stream: SpeechStream
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
    load: str
    schedule: str
    silence_ms: float  # the most any speaking stream's real-time listener heard in the joining window
    gap_before_ms: float
    gap_after_ms: float
    gap_median_ms: float
    gap_worst_ms: float
    first_audio_ms: list[float]
    prompt_positions: int
    steps: int
    work_ms: float  # the device time of the joiners' prefill, each alone on the idle engine
    in_hand_ms: float  # the least audio any speaker's listener had in hand when the joins came
    bound_ms: float  # the gap-free bound (module docstring)

    def first_audio(self, q: float) -> float:
        return float(np.percentile(self.first_audio_ms, q))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.002)


def silence_s(arrivals: list[float], start: float, end: float) -> float:
    """Seconds a real-time player of one-frame chunks, started at the first chunk with no extra
    buffer, waits for audio between ``start`` and ``end`` (it plays each frame when it has arrived
    and the frame before has played)."""
    silent, ends = 0.0, arrivals[0]
    for arrival in arrivals:
        if arrival > ends:
            silent += max(0.0, min(arrival, end) - max(ends, start))
        ends = max(ends, arrival) + FRAME_S
    return silent


def joiner(i: int, context: tuple[Segment, ...], max_frames: int = 40) -> SynthesisRequest:
    return SynthesisRequest(
        f"Reply number {i}: sure, let me check that for you.",
        context=context,
        seed=100 + i,
        chunks=ONE_FRAME,
        max_audio_ms=80 * max_frames,
    )


def idle_prefill_s(engine: MisoEngine, context: tuple[Segment, ...], n: int) -> float:
    """The device time of prefilling ``n`` joiners' prompts, each alone on the idle engine (its
    passes as the scheduler measured them; one after another, so no other request's preparation
    shares the CPU with them): the least the joins cost."""
    budget = engine._scheduler.prefill_budget
    observe, passes = budget.observe_pass, []

    def record(positions: int, seconds: float, context: float = 0.0) -> None:
        passes.append(seconds)
        observe(positions, seconds, context)

    budget.observe_pass = record  # type: ignore[method-assign]  # the scheduler looks it up per pass
    try:
        for i in range(n):
            stream = engine.stream(joiner(i, context, max_frames=2))
            next(stream)
            stream.cancel()
        time.sleep(0.2)  # on CUDA a pass's time is reported once the scheduler sees its end event
    finally:
        del budget.observe_pass
    return sum(passes)


def gap_free_bound_s(work_s: float, slack_s: float, step_s: float) -> float:
    """The soonest the last joiner could have its first audio with no listener running dry: the
    joiners' prefill (``work_s`` of device time) is paid from the speakers' ``slack_s`` in hand and
    then from each frame's spare time (``FRAME_S - step_s``, one frame per step), and the last
    joiner's first frame needs a step too; inf: a step alone overruns the frame, and work remains."""
    debt = work_s - max(slack_s, 0.0)
    if debt <= 0:
        frames = 0
    elif step_s >= FRAME_S:
        return math.inf
    else:
        frames = math.ceil(debt / (FRAME_S - step_s))
    return work_s + (frames + 1) * step_s


def parse_load(load: str) -> tuple[int, int]:
    speakers, _, joiners = load.partition("+")
    return int(speakers), int(joiners)


def run_schedule(model_dir: Path | None, load: str, schedule: str, args: argparse.Namespace) -> Result:
    n_speakers, n_joiners = parse_load(load)
    options = {
        "max_batch": n_speakers + n_joiners,
        "prefill_chunk": parse_prefill_chunk("auto" if schedule == "share" else schedule),
    }
    if args.random_weights:  # a released layout drawn on the device: the real model's work per frame and pass
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        engine = random_engine(
            args.random_weights, device=args.device, dtype=dtype, tokenizer=args.tokenizer, **options
        )
    else:
        assert model_dir is not None
        engine = MisoEngine.load(model_dir, device=args.device, watermark=False, progress=False, **options)
    if schedule == "share":  # no slack is ever lent: the budget's own share only
        engine._scheduler.slack_floor_s = float("inf")
    try:
        context = joiner_context(args.context)
        warm = engine.synthesize(SynthesisRequest("Warming up.", context=context, seed=0, max_audio_ms=160))
        work_s = idle_prefill_s(engine, context, n_joiners)
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
            for i in range(n_speakers)
        ]
        warm_chunks = round(args.warm_s / FRAME_S)  # one frame per chunk
        wait_for(lambda: all(len(c.arrivals) >= warm_chunks for c in speakers), 300, "the speakers to start")
        steps_before = engine.metrics().steps
        joined = time.perf_counter()
        joiners = [Consumer(engine.stream(joiner(i, context))).start() for i in range(n_joiners)]
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
    window_end = last_first + AFTER_CHUNKS * statistics.median(after)
    in_hand = min(sum(a <= joined for a in c.arrivals) * FRAME_S - (joined - c.arrivals[0]) for c in speakers)
    bound = gap_free_bound_s(work_s, in_hand, statistics.median(before))
    return Result(
        load=load,
        schedule=schedule,
        silence_ms=1000 * max(silence_s(c.arrivals, joined, window_end) for c in speakers),
        gap_before_ms=1000 * statistics.median(before),
        gap_after_ms=1000 * statistics.median(after),
        gap_median_ms=1000 * statistics.median(during),
        gap_worst_ms=1000 * max(during),
        first_audio_ms=[1000 * (c.arrivals[0] - joined) for c in joiners],
        prompt_positions=warm.stats.prompt_frames,
        steps=steps,
        work_ms=1000 * work_s,
        in_hand_ms=1000 * in_hand,
        bound_ms=1000 * bound,
    )


def describe(schedule: str) -> str:
    names = {"0": "whole prompts", "none": "whole prompts", "share": "auto, no deadlines", "auto": "auto (deadlines)"}
    return names.get(schedule, f"{schedule} positions/pass")


ROW = "{:<7}{:<20}{:>8}{:>8}{:>8}{:>9}{:>8}{:>9}{:>12}{:>8}{:>9}{:>7}"


def print_table(rows: list[tuple[str, ...]]) -> None:
    header = (
        ROW.format(
            "load",
            "schedule",
            "step",
            "step",
            "in",
            "gap",
            "worst /",
            "listener",
            "first audio",
            "",
            "gap-free",
            "steps",
        )
        + "\n"
        + ROW.format("", "", "before", "after", "hand", "worst", "step", "silence", "p50", "max", "bound", "")
    )
    print(header)
    print("-" * len(header.splitlines()[0]))
    for cells in rows:
        print(ROW.format(*cells))


def med(figures: list[Result], f) -> float:
    """The median of one figure over ``figures`` (one run: its own figure)."""
    return statistics.median(f(r) for r in figures)


def row(figures: list[Result]) -> tuple[str, ...]:
    return (
        figures[0].load,
        describe(figures[0].schedule),
        f"{med(figures, lambda r: r.gap_before_ms):.0f}ms",
        f"{med(figures, lambda r: r.gap_after_ms):.0f}ms",
        f"{med(figures, lambda r: r.in_hand_ms):.0f}ms",
        f"{med(figures, lambda r: r.gap_worst_ms):.0f}ms",
        f"{med(figures, lambda r: r.gap_worst_ms / r.gap_after_ms):.1f}x",
        f"{med(figures, lambda r: r.silence_ms):.0f}ms",
        f"{med(figures, lambda r: r.first_audio(50)):.0f}ms",
        f"{med(figures, lambda r: max(r.first_audio_ms)):.0f}ms",
        f"{med(figures, lambda r: r.bound_ms):.0f}ms",
        f"{med(figures, lambda r: r.steps):.0f}",
    )


def verdicts(results: list[Result], loads: list[str], schedules: list[str]) -> list[str]:
    """Per load and schedule: no listener silence, and the last joiner within 1.5x of whole prompts."""
    lines = []
    for load in loads:
        at = [r for r in results if r.load == load]
        whole = [r for r in at if r.schedule in ("0", "none")]
        base = med(whole, lambda r: max(r.first_audio_ms)) if whole else None
        for schedule in schedules:
            runs = [r for r in at if r.schedule == schedule]
            silence = med(runs, lambda r: r.silence_ms)
            last = med(runs, lambda r: max(r.first_audio_ms))
            ratio = f"{last / base:.2f}x whole prompts" if base else "no whole-prompts run"
            ok = silence == 0 and base is not None and last <= 1.5 * base
            bound = med(runs, lambda r: r.bound_ms)
            verdict = "meets the goal" if ok else "misses the goal"
            if not ok and base is not None and bound > 1.5 * base:
                verdict += f" (out of reach: the gap-free bound is {bound / base:.2f}x)"
            lines.append(
                f"  {load:<6} {describe(schedule):<20} silence {silence:.0f} ms, last joiner {ratio}: {verdict}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedules", default="0,share,auto", help="prefill_chunk values (or share), comma separated")
    parser.add_argument("--loads", default="4+4,8+4,12+4", help="speakers+joiners per load, comma separated")
    parser.add_argument("--context", type=int, default=1800, help="prompt positions of each joiner (about)")
    parser.add_argument(
        "--warm-s", type=float, default=6.0, help="seconds of audio each speaker delivers before the joins"
    )
    parser.add_argument("--flavor", choices=sorted(FLAVORS), default="bench")
    parser.add_argument(
        "--random-weights",
        metavar="LAYOUT",
        help="instead of --flavor, a released layout (llama-8B, llama-1B) with random weights drawn on the device",
    )
    parser.add_argument("--tokenizer", help="tokenizer.json for --random-weights (default: the dev dependency's)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (a GPU runs the same random flavor)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every schedule, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    for s in schedules:
        parse_prefill_chunk("auto" if s == "share" else s)
    loads = [s.strip() for s in args.loads.split(",") if s.strip()]
    for load in loads:
        parse_load(load)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"model={args.random_weights or args.flavor} device={args.device} "
        f"loads (speakers+joiners)={','.join(loads)} context~{args.context} "
        f"torch threads={torch.get_num_threads()} load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        f"on {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = None if args.random_weights else make_tiny(Path(tmp) / "model", config=FLAVORS[args.flavor])
        results = []
        for repeat in range(args.repeats):
            for load, schedule in itertools.product(loads, schedules):
                result = run_schedule(model_dir, load, schedule, args)
                results.append(result)
                print(
                    f"  run {repeat + 1} {load} {describe(schedule)}: "
                    f"joiner prompt {result.prompt_positions} positions, "
                    f"first audio {', '.join(f'{t:.0f}' for t in sorted(result.first_audio_ms))} ms "
                    f"(their prefill alone: {result.work_ms:.0f} ms)",
                    flush=True,
                )
    print()
    print_table([row([r]) for r in results])
    if args.repeats > 1:
        print(f"\nmedian of {args.repeats} runs:")
        print_table(
            [row([r for r in results if (r.load, r.schedule) == key]) for key in itertools.product(loads, schedules)]
        )
    print()
    print("step before / after: the speaking streams' median gap between chunks before the joins and after every")
    print("  joiner spoke (one frame step, with fewer and with more rows active).")
    print("gap worst: their worst gap from the joins until every joiner had its first audio;")
    print("  worst / step: that worst gap in frame steps at the load the joins brought.")
    print("listener silence: the most silence any speaking stream's real-time listener heard in that window")
    print("  (playback from the stream's first chunk, no extra buffer).")
    print("first audio: each joiner's first chunk, from the moment all joiners were submitted.")
    print("in hand: the least audio a speaker's listener had in hand when the joins came; gap-free bound: the")
    print("  soonest any schedule could give the last joiner its first audio without a listener running dry")
    print("  (prefill paid from that audio in hand and each frame's spare time; optimistic: see the docstring).")
    print("\ngoal (no listener silence, last joiner's first audio <= 1.5x whole prompts):")
    print("\n".join(verdicts(results, loads, schedules)))
    print(
        f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"total {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

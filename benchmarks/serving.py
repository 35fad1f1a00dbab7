"""In-process engine vs the same engine behind `misotts-agents serve`, over loopback, in one run.

What does putting the engine in its own server process cost a bot? For each concurrency level N,
N requests of the same length (a different seed each) go, all at once:

- in-process: to a MisoEngine in this process (``engine.stream``, ``async for``), the way a Pipecat
  or LiveKit bot uses the shared engine;
- loopback: to a ``misotts-agents serve`` subprocess holding an identical engine (same checkpoint,
  device, max_batch), each request from its own RemoteEngine (its own WebSocket, opened beforehand, like
  separate bot processes), so the audio crosses the protocol: JSON start, binary int16 frames, JSON end.

Time to first audio is measured here, client side, from submission to the first chunk, in both modes;
throughput is frames of all N streams over the wall time to the last chunk. The two engines run one
after the other, never at once, so they do not share the CPU/GPU during a measurement.

    uv run python benchmarks/serving.py                        # tiny random checkpoint, CPU
    uv run python benchmarks/serving.py --model MisoLabs/MisoTTS --levels 1,8,32 --frames 50   # a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from misotts_agents.engine.miso_engine import MisoEngine
from misotts_agents.server import RemoteEngine
from misotts_agents.testing.tiny import make_tiny
from misotts_agents.tools.bench import StreamResult, consume, format_load, requests_for


async def in_process(engine: MisoEngine, requests) -> tuple[float, list[StreamResult]]:
    submitted = time.perf_counter()
    streams = [engine.stream(r) for r in requests]
    results = await asyncio.gather(*(consume(s, submitted) for s in streams))
    return time.perf_counter() - submitted, list(results)


async def loopback(url: str, requests) -> tuple[float, list[StreamResult]]:
    clients = [RemoteEngine(url) for _ in requests]
    try:
        await asyncio.gather(*(c.connect() for c in clients))  # bots keep their connection open
        submitted = time.perf_counter()
        streams = [c.stream(r) for c, r in zip(clients, requests, strict=True)]
        results = await asyncio.gather(*(consume(s, submitted) for s in streams))
        return time.perf_counter() - submitted, list(results)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


def start_server(model: str, device: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "misotts_agents.tools.cli", "serve", "--model", model, "--device", device]
    cmd += ["--no-watermark", "--max-batch", str(max_batch), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not come up within 600 s")
        time.sleep(0.5)


def row(level: int, mode: str, wall_s: float, results: list[StreamResult], frames: int) -> str:
    got = sum(r.frames for r in results)
    lost = sum(1 for r in results if r.frames != frames)
    ttfa = [r.first_audio_s * 1000 for r in results]
    return (
        f"{level:>3}  {mode:<12}{got / wall_s:>13.1f}{np.percentile(ttfa, 50):>11.0f}{np.percentile(ttfa, 95):>11.0f}"
        + (f"   ({lost} short streams)" if lost else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model dir or Hub repo (default: a fresh tiny random checkpoint)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--levels", default="1,4,8", help="comma-separated concurrency levels (default: 1,4,8)")
    parser.add_argument("--frames", type=int, default=25, help="frames per stream, 80 ms each (default 25 = 2 s)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per level and mode (default 2)")
    args = parser.parse_args(argv)
    levels = sorted({int(n) for n in args.levels.split(",")})
    max_batch = levels[-1]

    tmp = tempfile.TemporaryDirectory()
    model = args.model or str(make_tiny(Path(tmp.name) / "tiny"))
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"model={args.model or 'tiny random checkpoint'} device={args.device} max_batch={max_batch} watermark=off")
    print(f"load average at start (1/5/15 min): {format_load()} on {os.cpu_count()} CPUs")
    proc, url = start_server(model, args.device, max_batch)
    engine = MisoEngine.load(model, device=args.device, watermark=False, max_batch=max_batch, progress=False)
    try:
        warm = requests_for(max_batch, 3, 1000)
        asyncio.run(in_process(engine, warm))
        asyncio.run(loopback(url, warm))
        lines = []
        for level in levels:
            for repeat in range(args.repeats):
                requests = requests_for(level, args.frames, 1 + repeat)
                for mode, runner in (("in-process", in_process), ("loopback", loopback)):
                    target = engine if mode == "in-process" else url
                    wall_s, results = asyncio.run(runner(target, requests))
                    lines.append(row(level, mode, wall_s, results, args.frames))
                    print(f"  N={level} {mode} run {repeat + 1}: {wall_s:.2f} s", flush=True)
        print()
        print(f"{'N':>3}  {'mode':<12}{'agg frames/s':>13}{'TTFA p50':>11}{'TTFA p95':>11}   (ms, client side)")
        print("\n".join(lines))
        print(f"\neach stream: {args.frames} frames = {args.frames * 0.08:.2f} s of audio")
        print(f"load average at end (1/5/15 min): {format_load()}  (other work on the machine skews all figures)")
    finally:
        engine.close()
        proc.terminate()
        proc.wait(timeout=30)
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

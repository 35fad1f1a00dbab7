"""Does one client's large request delay another client's first audio? Measured through the server.

A victim asks for a short reply with no context, over its own WebSocket; an attacker, on another
connection, has just sent a start with minutes of context audio (Mimi-encoded during preparation,
then prefilled). The victim's time to first audio (client side, submission to first chunk) is
measured alone and right after the attacker's request, for two ways of preparing requests:

- ``one thread``: one preparation thread, first come first served (how the engine prepared before);
- ``fair``: the engine's :class:`~misotts_agents.engine.preparation.FairPreparation` (two threads,
  clients in turn, no client on more than one of them), the default.

Both run in one process, one after the other, on the same engine and server (loopback only):

    uv run python benchmarks/server_fairness.py                  # tiny random checkpoint, CPU
    uv run python benchmarks/server_fairness.py --model MisoLabs/MisoTTS --context-s 120   # a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import threading
import time

import numpy as np
import torch
import uvicorn

from misotts_agents.engine.miso_engine import MisoEngine
from misotts_agents.engine.preparation import PREP_WORKERS, FairPreparation
from misotts_agents.engine.request import Segment, SynthesisRequest
from misotts_agents.server import RemoteEngine
from misotts_agents.server.app import create_app
from misotts_agents.server.lifecycle import uvicorn_config
from misotts_agents.server.protocol import Limits
from misotts_agents.testing.tiny import make_tiny


def clip(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * 24_000)) / 24_000
    return (0.2 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def serve(engine: MisoEngine) -> tuple[uvicorn.Server, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limits = Limits(
        max_message_bytes=40 * 1024 * 1024, ws_max_size=48 * 1024 * 1024, max_audio_b64_bytes=32 * 1024 * 1024
    )
    server = uvicorn.Server(uvicorn_config(create_app(engine, limits=limits), "127.0.0.1", port, limits, "warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, port


async def first_audio(remote: RemoteEngine, request: SynthesisRequest) -> float:
    submitted = time.perf_counter()
    stream = remote.stream(request)
    await stream.__anext__()
    took = time.perf_counter() - submitted
    stream.cancel()
    return took


async def trial(
    url: str, attack: bool, context_s: float, frames: int, n: int, salt: int = 0
) -> tuple[list[float], list[float]]:
    """Victim (and attacker) first-audio times over ``n`` trials."""
    victim_t, attacker_t = [], []
    async with RemoteEngine(url) as victim, RemoteEngine(url) as attacker:
        await victim.connect()
        await attacker.connect()
        for i in range(n):
            tasks = []
            if attack:
                # A different clip every trial and configuration: the engine caches the codes it encoded.
                segments = tuple(
                    Segment(1, f"Part {k} of a long story.", clip(30.0, 140 + 7 * i + k + 300 * salt))
                    for k in range(int(context_s // 30))
                )
                big = SynthesisRequest("And so it ends.", context=segments, max_audio_ms=80 * frames, seed=i)
                tasks.append(asyncio.create_task(first_audio(attacker, big)))
                await asyncio.sleep(0.05)  # the attacker's request is being prepared when the victim's comes
            small = SynthesisRequest(f"Hello number {i}.", max_audio_ms=80 * frames, seed=100 + i)
            victim_t.append(await first_audio(victim, small))
            if tasks:
                attacker_t.append(await tasks[0])
            await asyncio.sleep(0.2)
    return victim_t, attacker_t


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms (max {max(values) * 1000:.0f})" if values else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: a tiny random one made here)")
    p.add_argument("--device", default=None)
    p.add_argument("--context-s", type=float, default=90.0, help="seconds of context audio the attacker sends")
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: a shared CPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or make_tiny(tempfile.mkdtemp(prefix="fairness-"), seed=0)
    engine = MisoEngine.load(model, device=args.device, watermark=False, max_batch=4, progress=False)
    server, port = serve(engine)
    url = f"ws://127.0.0.1:{port}"
    rows = []
    try:
        for salt, (name, workers) in enumerate((("one thread", 1), ("fair", PREP_WORKERS))):
            engine._prep.shutdown()  # the benchmark's only reach inside: how preparation is shared
            engine._prep = FairPreparation(engine._prepare, workers=workers)
            asyncio.run(trial(url, False, 0, args.frames, 1))  # warm-up
            alone, _ = asyncio.run(trial(url, False, 0, args.frames, args.trials))
            victim, attacker = asyncio.run(trial(url, True, args.context_s, args.frames, args.trials, salt))
            rows.append((name, alone, victim, attacker))
    finally:
        server.should_exit = True
        engine.close()
    print(f"victim time to first audio, {args.trials} trials each; attacker: {args.context_s:g} s of context audio")
    print(f"{'preparation':<12} | {'victim alone':<22} | {'victim + attacker':<22} | attacker's own first audio")
    for name, alone, victim, attacker in rows:
        print(f"{name:<12} | {ms(alone):<22} | {ms(victim):<22} | {ms(attacker)}")


if __name__ == "__main__":
    main()

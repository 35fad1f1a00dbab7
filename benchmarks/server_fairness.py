"""Does one client's large request, or one tenant's burst, delay another's first audio? Measured
through the server, in two parts.

``--part prep``: a victim asks for a short reply with no context, over its own WebSocket; an attacker, on another
connection, has just sent a start with minutes of context audio (Mimi-encoded during preparation,
then prefilled). The victim's time to first audio (client side, submission to first chunk) is
measured alone and right after the attacker's request, for two ways of preparing requests:

- ``one thread``: one preparation thread, first come first served (how the engine prepared before);
- ``fair``: the engine's :class:`~misotts_agents.engine.preparation.FairPreparation` (two threads,
  clients in turn, no client on more than one of them), the default.

Both run in one process, one after the other, on the same engine and server (loopback only).

``--part burst``: tenant A sends ``--burst`` long requests at once (two connections); 1.5 s later
tenant B sends one short request. B's time to first audio, alone and during A's burst, next to one
slot's turnover (a long request alone), for two engine configurations in one run: admission first
come first served (``MisoEngine.load(fair=False)``) and in turn across tenants (``fair=True``, the
default; engine/admission.py).

    uv run python benchmarks/server_fairness.py                  # both parts, tiny random checkpoint, CPU
    uv run python benchmarks/server_fairness.py --part burst --model MisoLabs/MisoTTS --device cuda
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
from misotts_agents.server.tenants import Tenants
from misotts_agents.testing.tiny import make_tiny


def clip(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(seconds * 24_000)) / 24_000
    return (0.2 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def serve(engine: MisoEngine, tenants: Tenants | None = None) -> tuple[uvicorn.Server, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limits = Limits(
        max_message_bytes=40 * 1024 * 1024, ws_max_size=48 * 1024 * 1024, max_audio_b64_bytes=32 * 1024 * 1024
    )
    app = create_app(engine, limits=limits, tenants=tenants)
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, limits, "warning"))
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


def prep_part(args: argparse.Namespace, model: str) -> None:
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


TENANT_A, TENANT_B = "tenant-a-token-0123456789", "tenant-b-token-0123456789"


async def burst_trial(url: str, burst: int, long_frames: int, frames: int, seed: int) -> float:
    """B's first audio, sent 1.5 s into A's burst of ``burst`` long requests (A's all finish)."""
    async with RemoteEngine(url, TENANT_A) as a1, RemoteEngine(url, TENANT_A) as a2, RemoteEngine(url, TENANT_B) as b:

        async def long(remote: RemoteEngine, i: int) -> None:
            request = SynthesisRequest(f"A long reply, part {i}.", max_audio_ms=80 * long_frames, seed=seed + i)
            async for _ in remote.stream(request):
                pass

        tasks = [asyncio.create_task(long((a1, a2)[i % 2], i)) for i in range(burst)]
        await asyncio.sleep(1.5)
        took = await first_audio(b, SynthesisRequest("Quick one.", max_audio_ms=80 * frames, seed=seed))
        await asyncio.gather(*tasks)
        return took


async def solo_s(url: str, token: str, frames: int, whole: bool) -> float:
    """One request on an idle server: its first audio, or (``whole``) all of it."""
    async with RemoteEngine(url, token) as remote:
        started = time.perf_counter()
        async for _ in remote.stream(SynthesisRequest("Alone.", max_audio_ms=80 * frames, seed=1)):
            if not whole:
                break
        return time.perf_counter() - started


def burst_part(args: argparse.Namespace, model: str) -> None:
    rows = []
    for admission in ("fifo", "fair"):
        engine = MisoEngine.load(
            model,
            device=args.device,
            watermark=False,
            max_batch=args.max_batch,
            progress=False,
            fair=admission == "fair",
        )
        server, port = serve(engine, Tenants({"a": TENANT_A, "b": TENANT_B}))
        url = f"ws://127.0.0.1:{port}"
        try:
            asyncio.run(solo_s(url, TENANT_B, args.frames, whole=True))  # warm-up
            alone = [asyncio.run(solo_s(url, TENANT_B, args.frames, whole=False)) for _ in range(args.trials)]
            turnover = [asyncio.run(solo_s(url, TENANT_A, args.long_frames, whole=True)) for _ in range(2)]
            during = [
                asyncio.run(burst_trial(url, args.burst, args.long_frames, args.frames, 100 * i))
                for i in range(args.trials)
            ]
            rows.append((admission, alone, turnover, during))
        finally:
            server.should_exit = True
            engine.close()
    print(
        f"tenant B's time to first audio, {args.trials} trials; tenant A: {args.burst} requests of "
        f"{args.long_frames} frames at once, max_batch={args.max_batch}"
    )
    print(f"{'admission':<10} | {'B alone':<22} | {'slot turnover':<22} | B during A's burst")
    for admission, alone, turnover, during in rows:
        print(f"{admission:<10} | {ms(alone):<22} | {ms(turnover):<22} | {ms(during)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("prep", "burst", "both"), default="both")
    p.add_argument("--model", default=None, help="checkpoint (default: a tiny random one made here)")
    p.add_argument("--device", default=None)
    p.add_argument("--context-s", type=float, default=90.0, help="prep: seconds of context audio the attacker sends")
    p.add_argument("--frames", type=int, default=3, help="frames of the victim's (tenant B's) request")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--burst", type=int, default=16, help="burst: tenant A's requests at once")
    p.add_argument("--long-frames", type=int, default=25, help="burst: frames of each of A's requests")
    p.add_argument("--max-batch", type=int, default=2, help="burst: engine slots")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: a shared CPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or make_tiny(tempfile.mkdtemp(prefix="fairness-"), seed=0)
    if args.part in ("prep", "both"):
        prep_part(args, model)
    if args.part in ("burst", "both"):
        burst_part(args, model)


if __name__ == "__main__":
    main()

"""Stopping `misotts-agents serve` (its own process): SIGTERM and SIGINT drain running streams with a
deadline, every client sees its stream end, the engine is closed, and the exit code is 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from server_client import collect
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

TOKEN = "shutdown-test-token-0123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(tiny_dir, port: int, drain_s: float) -> subprocess.Popen:
    args = ["--model", str(tiny_dir), "--device", "cpu", "--no-watermark", "--port", str(port), "--max-batch", "4"]
    env = os.environ | {"MISOTTS_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "misotts_agents.tools.cli", "serve", *args, "--drain-timeout", str(drain_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.3)


def start(rid: str, frames: int, **kw) -> str:
    return json.dumps(
        {"type": "start", "id": rid, "text": "Stopping soon.", "seed": 1, "max_audio_ms": 80 * frames} | kw
    )


async def read_until_closed(ws) -> None:
    """Read what is left until the server closes the connection (raises ConnectionClosed then)."""
    while True:
        await ws.recv()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_drains_then_ends_every_stream_and_closes_the_engine(tiny_dir, sig):
    port = free_port()
    proc = serve(tiny_dir, port, drain_s=2.0)
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def clients() -> dict:
        out: dict = {}
        async with (
            connect(f"ws://127.0.0.1:{port}/v1/stream", additional_headers=headers) as ws,
            httpx.AsyncClient(timeout=60) as http,
        ):
            # Paced at real time: the long ones outlast the 2 s drain, the short one ends within it.
            await ws.send(start("long", 400, max_ahead_s=0.1))
            await ws.send(start("short", 12, max_ahead_s=0.1))
            body = {"input": "Long speech.", "response_format": "pcm", "max_audio_ms": 80 * 400}

            async def speech() -> tuple[int, int]:
                async with http.stream(
                    "POST", f"http://127.0.0.1:{port}/v1/audio/speech", json=body, headers=headers
                ) as r:
                    return r.status_code, len(b"".join([p async for p in r.aiter_bytes()]))

            http_task = asyncio.create_task(speech())
            async with asyncio.timeout(30):
                assert isinstance(await ws.recv(), bytes)  # streaming has begun
            proc.send_signal(sig)
            signalled = time.monotonic()
            audio, ends = await collect(ws, {"long", "short"}, timeout=30)
            out["ends"], out["audio"] = ends, audio
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(read_until_closed(ws), 10)
            out["close"] = info.value.rcvd.code if info.value.rcvd else None
            out["http"] = await http_task
            out["took"] = time.monotonic() - signalled
        return out

    try:
        out = asyncio.run(clients())
        code = proc.wait(timeout=30)
        log = proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, log
    ends = out["ends"]
    assert ends["short"]["type"] == "end"
    assert ends["short"]["stats"]["frames"] == 12  # finished within the drain
    assert ends["long"]["type"] == "error"
    assert ends["long"]["code"] == "closed"  # told why it ended
    assert out["close"] == 1001
    status, size = out["http"]
    assert status == 200
    assert 0 < size < 2 * 400 * 1920  # the HTTP stream ended (cut short), cleanly
    assert out["took"] < 10
    assert "the engine is closed" in log
    assert "Traceback" not in log

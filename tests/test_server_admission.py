"""No silent waits: an HTTP speech request gets its status as soon as the engine gives it a slot
(not with its first audio), a request the engine or its tenant's cap refuses gets a retryable status
with ``Retry-After`` (503 busy, 429 too_many) in OpenAI's error shape, a WebSocket start the same
codes; and the server hands the backend the validated start with the tenant and client it serves."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest
from engines import load_tiny
from remote_server import LoopbackServer
from server_client import http_url, next_json, start, ws_url
from signals import wait_until
from websockets.asyncio.client import connect

from misotts_agents.audio import FRAME_SAMPLES
from misotts_agents.engine.request import AudioChunk, StreamStats
from misotts_agents.server import Limits
from misotts_agents.server.schema import Start

SPEECH = {"input": "Hello from Miso.", "response_format": "pcm"}
LONG = {**SPEECH, "max_audio_ms": 60_000}  # holds its slot until the client lets go


class HeldStream:
    """A stream admitted when ``admit`` is set and giving its one chunk when ``audio`` is set (set
    from the test's thread, read on the server's loop)."""

    def __init__(self, admit: threading.Event, audio: threading.Event) -> None:
        self.admit, self.audio = admit, audio
        self.stats = StreamStats(seed=0)
        self.sent = False

    @property
    def queued(self) -> bool:
        return not self.admit.is_set()

    async def wait_admitted(self) -> bool:
        while not self.admit.is_set():
            await asyncio.sleep(0.005)
        return True

    def __aiter__(self) -> HeldStream:
        return self

    async def __anext__(self) -> AudioChunk:
        while not self.audio.is_set():
            await asyncio.sleep(0.005)
        if self.sent:
            raise StopAsyncIteration
        self.sent = True
        return AudioChunk(np.zeros(FRAME_SAMPLES, np.float32), 0, 1, True)

    def cancel(self) -> None:
        self.audio.set()


class HeldBackend:
    """A backend (EngineBackend's interface) of held streams, recording what it was handed."""

    voices: dict = {}  # noqa: RUF012
    closed = False
    max_batch = 1
    free_slots = 0

    def __init__(self) -> None:
        self.admit, self.audio = threading.Event(), threading.Event()
        self.calls: list[tuple[Start, object, object]] = []

    def metrics(self) -> None:
        return None

    def start(self, start: Start, client: object = None, tenant: object = None) -> HeldStream:
        self.calls.append((start, client, tenant))
        return HeldStream(self.admit, self.audio)


@pytest.mark.asyncio
async def test_the_status_goes_out_at_admission_not_with_the_first_audio():
    backend = HeldBackend()
    with LoopbackServer(backend, token=None) as server:
        async with httpx.AsyncClient(timeout=10) as client:
            response = asyncio.create_task(_headers(client, http_url(server, "/v1/audio/speech"), SPEECH))
            await asyncio.sleep(0.3)
            assert not response.done()  # waiting for a slot: no status yet
            backend.admit.set()
            status, headers, body = await asyncio.wait_for(response, 5)
            assert status == 200  # before any audio
            assert headers["content-type"].startswith("audio/")
            assert not backend.audio.is_set()
            backend.audio.set()
            assert len(await asyncio.wait_for(body, 5)) == 2 * FRAME_SAMPLES
    ((start_, client_key, tenant),) = backend.calls
    assert isinstance(start_, Start)  # the validated model, not a dict
    assert start_.text == SPEECH["input"]
    assert tenant == "default"
    assert isinstance(client_key, str)
    assert client_key.startswith("http:default:")


async def _headers(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, httpx.Headers, asyncio.Task]:
    """Status and headers as soon as they come, and a task reading the body after them."""
    arrived: asyncio.Future = asyncio.get_running_loop().create_future()

    async def run() -> bytes:
        async with client.stream("POST", url, json=body) as response:
            arrived.set_result((response.status_code, response.headers))
            return await response.aread()

    task = asyncio.create_task(run())
    status, headers = await arrived
    return status, headers, task


async def refused_both_ways(server, client: httpx.AsyncClient, status: int, code: str, limits: Limits) -> None:
    """A speech request gets ``status`` with Retry-After and OpenAI's error shape, a WebSocket start
    an ``error`` with ``code``, retryable."""
    refused = await client.post(http_url(server, "/v1/audio/speech"), json=SPEECH)
    assert refused.status_code == status
    assert refused.headers["retry-after"] == str(limits.retry_after_s)
    error = refused.json()["error"]
    assert (error["code"], error["type"]) == (code, "server_error" if status >= 500 else "invalid_request_error")
    async with connect(ws_url(server)) as ws:
        await ws.send(start("w", 2))
        err = await next_json(ws)
    assert (err["type"], err["code"], err["retryable"]) == ("error", code, True)


@pytest.fixture(scope="module")
def one_slot(tiny_dir):
    """One slot and room to wait (a test may take the room away: max_queue is read at each submission)."""
    with load_tiny(tiny_dir, max_batch=1, max_queue=8) as engine:
        yield engine


@pytest.mark.asyncio
async def test_busy_is_a_503_with_retry_after_and_a_retryable_error(one_slot, monkeypatch):
    monkeypatch.setattr(one_slot, "max_queue", 0)  # a second request is refused as busy
    with LoopbackServer(one_slot, token=None) as server:
        url = http_url(server, "/v1/audio/speech")
        async with httpx.AsyncClient(timeout=20) as client:
            status, _, body = await _headers(client, url, LONG)
            assert status == 200
            await refused_both_ways(server, client, 503, "busy", Limits())
            body.cancel()
        assert wait_until(lambda: one_slot.free_slots == 1, timeout=10)


@pytest.mark.asyncio
async def test_a_tenant_over_its_waiting_cap_gets_429_and_its_queued_request_is_served(one_slot):
    limits = Limits(max_waiting_per_tenant=1)  # the engine has room: the tenant's cap is what refuses
    with LoopbackServer(one_slot, token=None, limits=limits) as server:
        url = http_url(server, "/v1/audio/speech")
        async with httpx.AsyncClient(timeout=30) as client:
            _, _, holder = await _headers(client, url, LONG)  # has the slot
            waiting = asyncio.create_task(_headers(client, url, {**SPEECH, "max_audio_ms": 160}))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # queued: no status yet
            await refused_both_ways(server, client, 429, "too_many", limits)
            started = time.perf_counter()
            holder.cancel()  # the slot frees: the waiting request gets its status, then its audio
            status, _, body = await asyncio.wait_for(waiting, 20)
            assert status == 200
            assert len(await asyncio.wait_for(body, 20)) == 2 * 2 * FRAME_SAMPLES
            assert time.perf_counter() - started < 20


def test_the_waiting_cap_has_a_flag_and_a_default():
    from misotts_agents.tools.cli import build_parser

    args = build_parser().parse_args(["serve", "--max-waiting-per-tenant", "3"])
    assert args.max_waiting_per_tenant == 3
    assert build_parser().parse_args(["serve"]).max_waiting_per_tenant == Limits().max_waiting_per_tenant


def test_the_engines_queue_and_wait_bound_have_flags_and_refuse_absurd_values(capsys):
    from misotts_agents.engine.scheduler import DEFAULT_MAX_WAIT_S
    from misotts_agents.tools.cli import build_parser

    args = build_parser().parse_args(["serve", "--max-queue", "5", "--max-wait-s", "2.5"])
    assert (args.max_queue, args.max_wait_s) == (5, 2.5)
    assert build_parser().parse_args(["serve"]).max_wait_s == DEFAULT_MAX_WAIT_S
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--max-wait-s", bad])
        assert "--max-wait-s" in capsys.readouterr().err

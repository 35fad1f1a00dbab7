"""AudioStream (engine/audio_stream.py): each stream's admission is awaited, never polled, and a
caller's first-audio timeout starts there. The engine's own stream is tested in test_scheduler.py,
the Ray ingress's in test_ray_serve.py, the LiveKit inference process's in test_livekit.py."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from remote_server import server_fixture
from signals import tone

from misotts_agents.engine.audio_stream import Admission, first_chunk
from misotts_agents.engine.memory import ConversationMemory
from misotts_agents.engine.request import AudioChunk, StreamStats, SynthesisRequest
from misotts_agents.errors import EngineBusy
from misotts_agents.server import RemoteEngine
from misotts_agents.server.sessions import SessionStream

server = server_fixture("engine", token=None)


class HeldStream:
    """An engine stream that waits for a slot until the test sets ``admit``, then speaks nothing
    until it is cancelled."""

    def __init__(self) -> None:
        self.admit = threading.Event()  # set from the test's loop, read on the server's
        self.stats = StreamStats()
        self.codes = np.zeros((0, 32), dtype=np.int64)
        self.cancelled = False

    @property
    def queued(self) -> bool:
        return not self.admit.is_set()

    async def wait_admitted(self) -> bool:
        await asyncio.to_thread(self.admit.wait)
        return True

    def cancel(self) -> None:
        self.cancelled = True
        self.admit.set()

    def __aiter__(self) -> HeldStream:
        return self

    async def __anext__(self) -> AudioChunk:
        await asyncio.sleep(3600)
        raise StopAsyncIteration


async def until(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_the_remote_stream_is_admitted_by_the_servers_message(server, engine, monkeypatch):
    """The server says ``queued``, then ``admitted`` when the engine gives the request its slot: the
    remote stream's ``wait_admitted`` returns then, before any audio."""
    held = HeldStream()
    monkeypatch.setattr(engine, "stream", lambda request, **options: held)
    async with RemoteEngine(server.url, codes=False) as remote:
        stream = remote.stream(SynthesisRequest("Hello."))
        reading = asyncio.ensure_future(anext(stream))  # sends the start
        admission = asyncio.ensure_future(stream.wait_admitted())
        await until(lambda: stream.queued)
        assert not admission.done()
        held.admit.set()
        assert await asyncio.wait_for(admission, 10) is True
        assert not stream.queued
        assert not reading.done()  # no audio came: the message alone admitted it
        reading.cancel()
        await until(lambda: held.cancelled)


@pytest.mark.asyncio
async def test_a_remote_stream_refused_by_the_server_is_never_admitted(server, engine, monkeypatch):
    def busy(request, **options):
        raise EngineBusy("full")

    monkeypatch.setattr(engine, "stream", busy)
    async with RemoteEngine(server.url, codes=False) as remote:
        stream = remote.stream(SynthesisRequest("Hello."))
        with pytest.raises(EngineBusy):
            async for _ in stream:
                pass
        assert await asyncio.wait_for(stream.wait_admitted(), 1) is False


@pytest.mark.asyncio
async def test_a_session_stream_forwards_its_engine_streams_admission():
    held = HeldStream()
    stream = SessionStream(held, ConversationMemory(), more=False)
    assert stream.queued
    held.admit.set()
    assert await asyncio.wait_for(stream.wait_admitted(), 5) is True
    assert not stream.queued


class Scripted:
    """Admitted after ``admit_s``; its one chunk comes ``speak_s`` after that."""

    def __init__(self, admit_s: float, speak_s: float) -> None:
        self.admit_s, self.speak_s = admit_s, speak_s
        self.admission = Admission()
        self.stats = StreamStats()
        self.queued = True

    async def wait_admitted(self) -> bool:
        return await self.admission.wait()

    def cancel(self) -> None:
        self.admission.settle(False)

    def __aiter__(self) -> Scripted:
        return self

    async def __anext__(self) -> AudioChunk:
        await asyncio.sleep(self.admit_s)
        self.queued = False
        self.admission.settle(True)
        await asyncio.sleep(self.speak_s)
        return AudioChunk(tone(0.08), 0, 1, True)


@pytest.mark.asyncio
async def test_the_first_audio_timeout_starts_at_admission():
    slow_queue = Scripted(admit_s=0.5, speak_s=0.05)
    assert (await first_chunk(slow_queue, slow_queue.__aiter__(), timeout=0.3)).frames == 1
    slow_speech = Scripted(admit_s=0.05, speak_s=1.0)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await first_chunk(slow_speech, slow_speech.__aiter__(), timeout=0.3)
    assert time.monotonic() - started < 0.8

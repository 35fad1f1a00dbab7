"""The engine's watermark (engine/marking.py): every chunk that leaves in a step is marked in one
batched call on the marker's thread; a request's marked audio does not depend on its neighbours; a
failed mark ends its request alone; ``watermark=False`` requests never reach the marker; cancelling
drops what is pending; closing the engine stops the thread."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from signals import wait_until

from misotts_agents.engine.miso_engine import MisoEngine
from misotts_agents.engine.request import AudioChunk, ChunkSchedule, SynthesisRequest
from misotts_agents.engine.stream import SpeechStream
from misotts_agents.errors import EngineClosed

FRAMES = 6
ONE_FRAME = ChunkSchedule(first_frames=1, growth=1.0, max_frames=1)  # a chunk every step
TEXTS = ["Hello there.", "One moment please.", "Sure, I can do that.", "Thanks for waiting!"]


def load(tiny_dir, **options) -> MisoEngine:
    """A CPU engine on the tiny checkpoint that watermarks (its bundled SilentCipher)."""
    return MisoEngine.load(tiny_dir, device="cpu", watermark=True, progress=False, max_batch=4, **options)


@pytest.fixture(scope="module")
def marked(tiny_dir):
    with load(tiny_dir) as engine:
        yield engine


def request(i: int, **options) -> SynthesisRequest:
    return SynthesisRequest(TEXTS[i % len(TEXTS)], seed=30 + i, **{"max_audio_ms": 80 * FRAMES, **options})


def collect(stream: SpeechStream) -> tuple[np.ndarray, np.ndarray]:
    with stream:
        chunks = list(stream)
    return np.concatenate([c.pcm for c in chunks]), stream.codes


def assert_close(pcm: np.ndarray, reference: np.ndarray) -> None:
    assert pcm.shape == reference.shape
    np.testing.assert_allclose(pcm, reference, atol=1e-5 * max(1.0, float(np.abs(reference).max())))


class Calls:
    """A spy on the engine's ``Watermarker.mark_streams``: the streams of each call, in order;
    ``change`` may replace a call's results (item index -> result)."""

    def __init__(self, engine: MisoEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        watermarker = engine.watermarker
        assert watermarker is not None
        real = watermarker.mark_streams
        self.calls: list[list[object]] = []  # each call's stream states

        def spy(items):
            self.calls.append([state for state, _ in items])
            return self.change(items, real(items))

        monkeypatch.setattr(watermarker, "mark_streams", spy)

    def change(self, items, results):
        return results

    def of(self, stream: SpeechStream) -> int:
        """How many calls carried the stream's chunks."""
        return sum(stream.watermark in call for call in self.calls)


def test_a_requests_marked_audio_does_not_depend_on_its_neighbours(marked):
    target = request(0)
    alone = marked.synthesize(target)
    unmarked = marked.synthesize(request(0, watermark=False))
    assert alone.stats.time_to_first_audio_s is not None
    assert 0 < alone.stats.time_to_first_audio_s <= alone.stats.elapsed_s
    assert not np.allclose(alone.pcm, unmarked.pcm, atol=1e-6)  # it is marked
    np.testing.assert_array_equal(alone.codes, unmarked.codes)
    streams = [marked.stream(target), *(marked.stream(request(i)) for i in (1, 2, 3))]
    results = [collect(s) for s in streams]
    pcm, codes = results[0]
    np.testing.assert_array_equal(codes, alone.codes)
    assert_close(pcm, alone.pcm)
    assert wait_until(lambda: marked.free_slots == marked.max_batch)


@pytest.mark.parametrize("overlap", [False, True])
def test_every_chunk_that_leaves_in_a_step_is_marked_in_one_call(tiny_dir, overlap, monkeypatch):
    with load(tiny_dir, overlap=overlap) as engine:
        spy = Calls(engine, monkeypatch)
        steps: list[tuple[int, object]] = []  # (the scheduler's step count, the stream's state) per chunk
        real = SpeechStream.deliver

        def deliver(stream, chunk):
            steps.append((engine._scheduler.counts.steps, stream.watermark))  # counted before the step's chunks leave
            real(stream, chunk)

        monkeypatch.setattr(SpeechStream, "deliver", deliver)
        streams = [engine.stream(request(i, chunks=ONE_FRAME if i % 2 else ChunkSchedule())) for i in range(4)]
        for stream in streams:
            pcm, _ = collect(stream)
            assert pcm.shape == (FRAMES * 1920,)
    by_step: dict[int, list[object]] = {}
    for step, state in steps:
        by_step.setdefault(step, []).append(state)
    assert spy.calls == list(by_step.values())  # one call per step that delivered, in order
    assert max(len(call) for call in spy.calls) > 1  # the rows that deliver together share a call


def test_a_failing_mark_ends_its_request_alone(marked, monkeypatch):
    """Async callers (as the integrations are): the bad stream raises the error after the chunk
    before it, its slot frees without the caller cancelling, the others get all their audio."""
    spy = Calls(marked, monkeypatch)
    goods = [request(i) for i in (1, 2, 3)]
    alone = [marked.synthesize(r) for r in goods]
    received = []

    def change(items, results):
        states = [state for state, _ in items]
        if bad.watermark in states and spy.of(bad) == 2:  # the bad stream's second chunk
            results[states.index(bad.watermark)] = RuntimeError("injected watermark failure")
        return results

    async def consume(stream, into):
        async for chunk in stream:  # no `with`: the failure itself must free the slot
            into.append(chunk)

    async def run():
        streams = [marked.stream(r) for r in goods]
        outs = [[] for _ in streams]
        results = await asyncio.gather(
            consume(bad, received), *(consume(s, o) for s, o in zip(streams, outs, strict=True)), return_exceptions=True
        )
        return results, streams, outs

    spy.change = change  # before the bad request is submitted: its second chunk fails for sure
    bad = marked.stream(request(0, max_audio_ms=80 * 40, chunks=ONE_FRAME))
    results, streams, outs = asyncio.run(run())
    assert isinstance(results[0], RuntimeError)
    assert "injected watermark failure" in str(results[0])
    assert results[1:] == [None] * len(goods)
    assert len(received) == 1  # the chunk before the failure came first
    assert bad.stats.stop_reason == "error"
    for stream, out, reference in zip(streams, outs, alone, strict=True):
        np.testing.assert_array_equal(stream.codes, reference.codes)
        assert_close(np.concatenate([c.pcm for c in out]), reference.pcm)
        assert stream.stats.stop_reason == "max_frames"
    assert wait_until(lambda: marked.free_slots == marked.max_batch)  # its failure cancelled it
    assert spy.of(bad) == 2  # nothing of it was marked after


def test_unwatermarked_requests_are_untouched_beside_a_marked_one(marked, monkeypatch):
    plain = [request(i, watermark=False) for i in (1, 2, 3)]
    unmarked = [marked.synthesize(r) for r in plain]
    spy = Calls(marked, monkeypatch)
    watermarked = marked.stream(request(0, chunks=ONE_FRAME))
    streams = [marked.stream(r) for r in plain]
    for stream, reference in zip(streams, unmarked, strict=True):
        assert stream.watermark is None
        pcm, _ = collect(stream)
        assert_close(pcm, reference.pcm)
    pcm, _ = collect(watermarked)
    assert pcm.shape == (FRAMES * 1920,)
    assert spy.calls
    assert all(call == [watermarked.watermark] for call in spy.calls)


def test_cancelling_drops_what_waits_for_marking(marked, monkeypatch):
    spy = Calls(marked, monkeypatch)
    entered, release = threading.Event(), threading.Event()

    def change(items, results):
        entered.set()
        assert release.wait(30)
        return results

    spy.change = change
    stream = marked.stream(request(0, max_audio_ms=80 * 40, chunks=ONE_FRAME))
    assert entered.wait(30)
    marker, scheduler = marked._marker, marked._scheduler
    assert marker is not None
    # The marker is stuck: the scheduler hands over steps until the backlog is full, then waits.
    assert wait_until(lambda: len(marker._batches) == marker.max_backlog + 1, timeout=30)
    steps = scheduler.counts.steps
    time.sleep(0.3)
    assert scheduler.counts.steps == steps
    assert len(marker._batches) == marker.max_backlog + 1
    puts = []
    real_put = stream.mailbox.put
    stream.mailbox.put = lambda item: (puts.append(item), real_put(item))
    stream.cancel()
    release.set()
    assert wait_until(lambda: marked.free_slots == marked.max_batch)
    assert wait_until(lambda: not marker._batches and not marker._pending)
    assert not any(isinstance(item, AudioChunk) for item in puts)  # nothing delivered after the cancel
    assert list(stream) == []
    assert spy.of(stream) == 1  # its pending chunks were dropped, not marked
    assert stream.stats.stop_reason == "cancelled"


def test_closing_the_engine_stops_the_marker(tiny_dir):
    with load(tiny_dir) as engine:
        marker = engine._marker
        assert marker is not None
        assert marker.thread.is_alive()
        stream = engine.stream(request(0, max_audio_ms=80 * 200, chunks=ONE_FRAME))
        assert next(stream).pcm.size
        engine.close()
    assert not marker.thread.is_alive()
    with pytest.raises(EngineClosed):
        list(stream)  # the chunks already on their way, then the engine's end

"""One request never harms another, in the engine: fault injection in a running batch.

Each test runs three good requests next to one that carries a fault (a value that slipped past
validation, a failing delivery, a batched step that fails because of it). The bad one ends with its
error; the good ones finish with exactly the audio they get alone. (A failing watermark: test_marking.py.)
"""

from __future__ import annotations

import asyncio
import itertools
import threading

import numpy as np
import pytest
from signals import wait_until

from misotts_agents.engine.request import MAX_SPEAKER, ChunkSchedule, Segment, SynthesisRequest
from misotts_agents.errors import InvalidRequest

FRAMES = 6
GOOD = [SynthesisRequest(f"Good request {i}.", seed=10 + i, max_audio_ms=80 * FRAMES) for i in range(3)]


@pytest.fixture(scope="module")
def alone(engine):
    """Each good request's audio and codes when it runs by itself."""
    return [engine.synthesize(r) for r in GOOD]


async def run_batch(engine, bad_stream_hook, bad_request=None):
    """The good requests and one bad one at once (the bad one submitted last: the newest).
    Returns the good results and the bad one's exception (or None)."""

    async def collect(stream):
        with stream:
            chunks = [c async for c in stream]
        return np.concatenate([c.pcm for c in chunks]), stream.codes, stream.stats

    goods = [engine.stream(r) for r in GOOD]
    bad = engine.stream(bad_request or SynthesisRequest("The bad one.", seed=99, max_audio_ms=80 * 40))
    bad_stream_hook(bad)
    results = await asyncio.gather(*(collect(s) for s in [*goods, bad]), return_exceptions=True)
    return results[:3], results[3]


def assert_goods_complete(goods, alone):
    for (pcm, codes, stats), ref in zip(goods, alone, strict=True):
        assert stats.stop_reason == "max_frames"
        assert stats.frames == FRAMES
        np.testing.assert_array_equal(codes, ref.codes)
        assert pcm.shape == ref.pcm.shape == (FRAMES * 1920,)
        np.testing.assert_allclose(pcm, ref.pcm, atol=1e-5 * max(1.0, float(np.abs(ref.pcm).max())))


def all_free(engine) -> bool:
    return wait_until(lambda: engine.free_slots == engine.max_batch, timeout=10)


def test_a_chunk_policy_that_breaks_mid_stream_ends_that_request_alone(engine, alone):
    """growth=NaN (as if it had slipped past validation) fails the chunk-size arithmetic in the step."""
    bad_request = SynthesisRequest("Bad chunks.", seed=5, max_audio_ms=80 * 40)
    object.__setattr__(bad_request.chunks, "growth", float("nan"))
    goods, error = asyncio.run(run_batch(engine, lambda s: None, bad_request))
    assert isinstance(error, ValueError)
    assert_goods_complete(goods, alone)
    assert all_free(engine)


@pytest.mark.parametrize("where", ["add_codes", "deliver"])
def test_failing_bookkeeping_of_one_row_ends_that_request_alone(engine, alone, where):
    def hook(stream):
        real = getattr(stream, where)
        calls = itertools.count()

        def breaks(*args):
            if next(calls) == 2:
                raise RuntimeError(f"injected {where} failure")
            return real(*args)

        setattr(stream, where, breaks)

    goods, error = asyncio.run(run_batch(engine, hook))
    assert isinstance(error, RuntimeError)
    assert where in str(error)
    assert_goods_complete(goods, alone)
    assert all_free(engine)


def test_a_batched_step_failing_because_of_the_newest_request_is_retried_without_it(engine, alone, monkeypatch):
    """A step that cannot run with the newest request in it (think: the memory it added) fails that
    request only: the step is retried without it, and the others never see an error."""
    scheduler = engine._scheduler
    real = scheduler.executor.stepper
    bad_streams = []

    def stepper(rows, *args):
        poisoned = {slot for slot, job in scheduler.running.items() if job.stream in bad_streams}
        if poisoned & set(rows.tolist()):
            raise RuntimeError("injected device failure")
        return real(rows, *args)

    monkeypatch.setattr(scheduler.executor, "stepper", stepper)
    goods, error = asyncio.run(run_batch(engine, bad_streams.append))
    assert isinstance(error, RuntimeError)
    assert "device failure" in str(error)
    assert_goods_complete(goods, alone)
    assert all_free(engine)


def test_a_step_that_fails_again_without_the_newest_fails_the_rest_and_the_engine_goes_on(engine, monkeypatch):
    scheduler = engine._scheduler
    real = scheduler.executor.stepper
    broken = threading.Event()
    broken.set()

    def stepper(rows, *args):
        if broken.is_set():
            raise RuntimeError("injected persistent failure")
        return real(rows, *args)

    monkeypatch.setattr(scheduler.executor, "stepper", stepper)
    failed_before = engine.metrics().failed
    goods, error = asyncio.run(run_batch(engine, lambda s: None))
    assert isinstance(error, RuntimeError)
    assert all(isinstance(g, RuntimeError) for g in goods)
    assert engine.metrics().failed - failed_before == 4
    broken.clear()
    assert engine.synthesize(GOOD[0]).codes.shape == (FRAMES, 32)
    assert all_free(engine)


def test_the_chunk_schedule_never_overflows():
    """The schedule of the issue's report (growth 1e308 was refused; the largest allowed growth and
    one-frame chunks) stays finite far beyond the longest utterance."""
    for chunks in (ChunkSchedule(1, 16.0, 2048), ChunkSchedule(1, 2.0, 1), ChunkSchedule(3, 1.0, 3)):
        sizes = list(itertools.islice(chunks.sizes(), 5000))
        assert all(chunks.first_frames <= n <= chunks.max_frames for n in sizes)
        assert sizes[-1] == chunks.max_frames


BAD_VALUES = [
    {"temperature": 1e308},
    {"temperature": None},
    {"temperature": float("nan")},
    {"topk": 2**63},
    {"seed": 10**100},
    {"seed": -1},
    {"speaker": None},
    {"speaker": MAX_SPEAKER + 1},
    {"speaker": True},
    {"max_audio_ms": None},
    {"max_audio_ms": float("inf")},
    {"max_audio_ms": 10**400},
    {"max_ahead_s": "1"},
    {"max_ahead_s": -1.0},
    {"watermark": "yes"},
    {"context": [Segment(10**9, "hm", np.zeros(1920, np.float32))]},
    {"context": ["not a segment"]},
    {"chunks": {"growth": 2}},
]


@pytest.mark.parametrize("bad", BAD_VALUES, ids=lambda d: f"{next(iter(d))}={next(iter(d.values()))!r:.20}")
def test_every_request_option_is_checked_when_the_request_is_made(bad):
    with pytest.raises(InvalidRequest):
        SynthesisRequest("Hello.", **bad)


@pytest.mark.parametrize(
    "chunks",
    [{"growth": 1e308}, {"growth": float("nan")}, {"first_frames": 0}, {"max_frames": 10**6}, {"first_frames": 2.0}],
)
def test_every_chunk_option_is_checked(chunks):
    with pytest.raises(InvalidRequest):
        ChunkSchedule(**chunks)


def test_preparation_takes_clients_in_turn_and_keeps_a_thread_for_the_others():
    """A client with three slow requests holds one of the two threads; another client's request,
    submitted after them, starts at once on the other."""
    from misotts_agents.engine.preparation import FairPreparation

    started: list[str] = []
    release = threading.Event()
    lock = threading.Lock()

    def work(item: str) -> None:
        with lock:
            started.append(item)
        if item.startswith("slow"):
            release.wait(10)

    prep = FairPreparation(work, workers=2)
    try:
        for i in range(3):
            prep.submit("attacker", f"slow{i}")
        assert wait_until(lambda: started == ["slow0"], timeout=5)
        prep.submit("victim", "quick")
        assert wait_until(lambda: started == ["slow0", "quick"], timeout=5)  # not behind slow1 and slow2
        release.set()
        assert wait_until(lambda: len(started) == 4, timeout=5)
        assert started[2:] == ["slow1", "slow2"]
    finally:
        release.set()
        prep.shutdown()

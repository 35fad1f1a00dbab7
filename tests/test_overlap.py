"""The overlapped step loop (scheduler.py, on CUDA by default): each frame step is queued before the
one before it is read. Run here on CPU with ``overlap=True``: the same audio as reading each step at
once, a row that ends while its next step is queued frees its slot for a clean new request, cancel
frees the slot; on CUDA, nothing in queuing a step or a prefill pass makes the host wait."""

import os
import threading

import numpy as np
import pytest
import torch
from engines import load_tiny
from signals import tone, wait_until

from misotts_agents.engine.request import ChunkSchedule, Segment, SynthesisRequest
from misotts_agents.model import codec

ONE_FRAME = ChunkSchedule(first_frames=1, growth=1.0, max_frames=1)
TEXTS = ["Hello there.", "One moment please.", "Sure, I can do that.", "Thanks for waiting!"]


@pytest.fixture(scope="module")
def overlapped(tiny_dir):
    with load_tiny(tiny_dir, max_batch=4, overlap=True) as engine:
        assert engine._scheduler.overlap
        yield engine


def collect(stream):
    chunks = list(stream)
    return np.concatenate([c.pcm for c in chunks]), stream.codes, stream.stats


def assert_same(result, reference):
    pcm, codes, _ = result
    np.testing.assert_array_equal(codes, reference.codes)
    assert pcm.shape == reference.pcm.shape
    np.testing.assert_allclose(pcm, reference.pcm, atol=1e-5 * max(1.0, float(np.abs(reference.pcm).max())))


def test_overlapped_steps_give_the_audio_of_steps_read_at_once(engine, overlapped):
    """Several requests of different lengths batched, seeded sampling: codes, audio, chunk sizes and
    counts equal the session engine's (which reads every step before queuing the next)."""
    assert not engine._scheduler.overlap  # CPU default
    reqs = [
        SynthesisRequest(t, seed=10 + i, max_audio_ms=80 * n)
        for i, (t, n) in enumerate(zip(TEXTS, (7, 3, 9, 5), strict=True))
    ]
    reference = [engine.synthesize(r) for r in reqs]
    before = overlapped.metrics()
    streams = [overlapped.stream(r) for r in reqs]
    results = [collect(s) for s in streams]
    for result, ref in zip(results, reference, strict=True):
        assert_same(result, ref)
        assert result[2].stop_reason == ref.stats.stop_reason == "max_frames"
    after = overlapped.metrics()
    assert after.frames - before.frames == sum(r.codes.shape[0] for r in reference)
    assert after.completed - before.completed == len(reqs)
    assert wait_until(lambda: overlapped.free_slots == overlapped.max_batch)


def test_a_row_ending_while_its_next_step_is_queued_frees_its_slot_cleanly(engine, overlapped, monkeypatch):
    """End-of-speech is seen only when a step is read, after the next step (with that row) is
    queued: the queued result is dropped, and the next request in that slot speaks exactly as alone."""
    sched = overlapped._scheduler
    real = sched._frame
    launches: list[list[int]] = []

    def eos_on_third(slots):  # slot 0's third frame comes out as end-of-speech
        frame = real(slots)
        launches.append(list(slots))
        if 0 in slots and sum(0 in s for s in launches) == 3:
            codes = frame.codes.clone()
            codes[slots.index(0)] = 0
            frame = frame._replace(codes=codes)
        return frame

    monkeypatch.setattr(sched, "_frame", eos_on_third)
    before = overlapped.metrics()
    ending = overlapped.stream(SynthesisRequest("I stop early.", seed=1, chunks=ONE_FRAME, max_audio_ms=80 * 20))
    next(ending)  # in slot 0 and speaking
    other_request = SynthesisRequest("I keep talking a while.", seed=2, chunks=ONE_FRAME, max_audio_ms=80 * 14)
    other = overlapped.stream(other_request)
    _, ending_codes, ending_stats = collect(ending)
    assert ending_stats.stop_reason == "eos"
    assert ending_codes.shape[0] == 2
    eos_at = next(i for i, s in enumerate(launches) if 0 in s and sum(0 in t for t in launches[: i + 1]) == 3)
    assert 0 in launches[eos_at + 1]  # queued before the end was read: its result was dropped
    newcomer_request = SynthesisRequest("A new request.", seed=3, max_audio_ms=80 * 6)
    newcomer = overlapped.stream(newcomer_request)  # the lowest free slot: the one that just ended
    assert_same(collect(newcomer), engine.synthesize(newcomer_request))
    assert_same(collect(other), engine.synthesize(other_request))
    assert wait_until(lambda: overlapped.free_slots == overlapped.max_batch)
    after = overlapped.metrics()  # the dropped result reached no stream and no count
    assert after.frames - before.frames == 2 + 14 + 6
    assert after.completed - before.completed == 3
    assert ending.codes.shape[0] == 2


def test_cancel_with_a_step_queued_frees_the_slot_and_the_next_request_is_clean(engine, overlapped):
    before = overlapped.metrics().cancelled
    stream = overlapped.stream(SynthesisRequest("Interrupt me.", seed=4, chunks=ONE_FRAME, max_audio_ms=80 * 200))
    next(stream)
    next(stream)
    stream.cancel()
    assert wait_until(lambda: overlapped.free_slots == overlapped.max_batch)
    assert overlapped.metrics().cancelled == before + 1
    request = SynthesisRequest("After the interruption.", seed=5, max_audio_ms=80 * 4)
    assert_same(collect(overlapped.stream(request)), engine.synthesize(request))


def test_switching_overlap_while_a_stream_speaks_loses_no_frame(engine, overlapped):
    """``engine.overlap`` may be switched at any time (bench's no-overlap mode): a step queued
    while overlapping is still read after the switch."""
    request = SynthesisRequest("Switch while I talk.", seed=6, chunks=ONE_FRAME, max_audio_ms=80 * 12)
    pieces = []
    try:
        for chunk in overlapped.stream(request):
            pieces.append(chunk.pcm)
            overlapped.overlap = not overlapped.overlap
    finally:
        overlapped.overlap = True
    reference = engine.synthesize(request)
    assert len(pieces) == 12
    np.testing.assert_allclose(np.concatenate(pieces), reference.pcm, atol=1e-5 * max(1.0, np.abs(reference.pcm).max()))


def test_prefill_passes_take_their_window_from_the_host(engine, overlapped, monkeypatch):
    """Reading a pass's positions on the device to size its attention window would make the host
    wait for every queued step: the scheduler gives the window it knows from its own positions."""

    def device_read(input_pos):
        raise AssertionError("a prefill pass read its positions from the device")

    monkeypatch.setattr(overlapped.model.backbone, "window_for", device_read)
    context = (Segment(1, "What the user said before.", tone(2.0, freq=220)),)
    request = SynthesisRequest("And now my reply.", context=context, seed=7, max_audio_ms=80 * 3)
    assert_same(collect(overlapped.stream(request)), engine.synthesize(request))


def test_a_failed_decode_ends_its_steps_requests_without_a_retry(overlapped, monkeypatch):
    """Mimi's streaming state may have moved before its decode failed: the step is not retried
    (that would decode a frame twice for the rows left), its requests end, the engine goes on."""
    sched, real = overlapped._scheduler.executor, overlapped._scheduler.executor._decode
    calls = []

    def fails_once(rows, codes, top_row):
        calls.append(rows.tolist())
        if len(calls) == 1:
            raise RuntimeError("simulated decode failure")
        return real(rows, codes, top_row)

    monkeypatch.setattr(sched, "_decode", fails_once)
    with pytest.raises(RuntimeError, match="simulated decode failure"):
        overlapped.synthesize(SynthesisRequest("This one fails.", max_audio_ms=320))
    assert len(calls) == 1  # not retried
    assert overlapped.synthesize(SynthesisRequest("This one works.", max_audio_ms=320)).codes.shape == (4, 32)
    assert wait_until(lambda: overlapped.free_slots == overlapped.max_batch)


def test_a_failure_outside_the_isolated_parts_ends_the_speaking_requests_not_the_engine(overlapped, monkeypatch):
    """If reading a step fails outside the per-row isolation, a queued step's results may be lost:
    every speaking request ends with the error (none goes on with a gap), and the engine serves on."""
    sched, real = overlapped._scheduler, overlapped._scheduler._read
    armed = threading.Event()
    armed.set()

    def broken(step):
        if armed.is_set():
            armed.clear()
            raise RuntimeError("simulated scheduler bug")
        return real(step)

    monkeypatch.setattr(sched, "_read", broken)
    with pytest.raises(RuntimeError, match="simulated scheduler bug"):
        overlapped.synthesize(SynthesisRequest("This one fails.", max_audio_ms=320))
    assert overlapped.synthesize(SynthesisRequest("This one works.", max_audio_ms=320)).codes.shape == (4, 32)
    assert wait_until(lambda: overlapped.free_slots == overlapped.max_batch)


def assert_audio_is_the_whole_clip_decode_of_its_codes(engine, rel: float) -> None:
    """More requests than slots, one-frame chunks: each stream's audio equals a whole-clip Mimi decode
    of its own codes, so no decode read another row's or an earlier occupant's state (on CUDA the
    decodes and resets run on their own stream, beside the next frame step)."""
    streams = [
        engine.stream(SynthesisRequest(t, seed=20 + i, chunks=ONE_FRAME, max_audio_ms=80 * (5 + i)))
        for i, t in enumerate(TEXTS * 2)
    ]
    for stream in streams:
        pcm = np.concatenate([c.pcm for c in stream])
        codes = torch.from_numpy(np.where(stream.codes < codec.CODEBOOK_SIZE, stream.codes, 0).T.copy())
        whole = codec.decode(engine.mimi, codes).cpu().numpy()  # the model holds no streaming state
        assert pcm.shape == whole.shape
        assert np.abs(pcm - whole).max() <= rel * np.abs(whole).max(), stream.request.text


def test_each_streams_audio_is_the_whole_clip_decode_of_its_codes(overlapped):
    assert_audio_is_the_whole_clip_decode_of_its_codes(overlapped, rel=1e-5)


# ------------------------------------------------------------------- on a GPU (scripts/gpu_check.sh)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_audio_decoded_beside_the_next_step_is_the_whole_clip_decode():
    from misotts_agents.testing.random_weights import random_engine

    engine = random_engine(
        "tiny", device="cuda", dtype=torch.bfloat16, tokenizer=os.environ.get("MISOTTS_TOKENIZER"), max_batch=4
    )
    try:
        assert engine._scheduler.executor.mimi_stream is not None
        assert engine._scheduler.executor.decoder.captured_sizes == [4]  # the decode's CUDA graph, captured at start-up
        assert_audio_is_the_whole_clip_decode_of_its_codes(engine, rel=1e-2)  # TF32 convolutions
    finally:
        engine.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_queuing_steps_and_prefill_passes_never_waits_for_the_device(monkeypatch):
    """With CUDA's sync debug mode set to error while the scheduler queues a step or a prefill
    pass, any host wait (a blocking copy, a read of a device value) fails the request. (The mode
    is process-wide: the requests here have no context audio, whose encoding on a preparation
    thread ends with a wait of its own.)"""
    from misotts_agents.testing.random_weights import random_engine

    engine = random_engine(
        "tiny", device="cuda", dtype=torch.bfloat16, tokenizer=os.environ.get("MISOTTS_TOKENIZER"), max_batch=4
    )
    try:
        sched = engine._scheduler
        assert sched.overlap
        context = (Segment(1, "Context audio, encoded on the preparation thread's stream.", tone(2.0)),)
        warm = engine.synthesize(SynthesisRequest("Warm up the decoder.", context=context, seed=1, max_audio_ms=400))
        assert warm.codes.shape == (5, 32)
        checked = threading.Event()

        def strict(method):
            def run(*args):
                torch.cuda.set_sync_debug_mode("error")
                try:
                    return method(*args)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    checked.set()

            return run

        monkeypatch.setattr(sched, "_step", strict(sched._step))
        monkeypatch.setattr(sched, "_prefill", strict(sched._prefill))
        streams = [engine.stream(SynthesisRequest(t, seed=i, max_audio_ms=80 * 6)) for i, t in enumerate(TEXTS)]
        for stream in streams:
            pcm = np.concatenate([c.pcm for c in stream])
            assert pcm.size == 6 * 1920
            assert stream.stats.stop_reason == "max_frames"
        assert checked.is_set()
    finally:
        engine.close()

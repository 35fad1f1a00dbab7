"""The streaming engine on the tiny checkpoint: chunking, audio lengths, seeds, cancel, errors."""

import asyncio
import threading
import time

import numpy as np
import pytest
import torch
from signals import tone, wait_until

from misotts_agents.engine.request import ChunkSchedule, Segment, SynthesisRequest
from misotts_agents.errors import InvalidRequest, ModelSourceError
from misotts_agents.model import codec

FRAME = 1920


def req(text="Hello from Miso.", frames=12, **kw):
    return SynthesisRequest(text=text, max_audio_ms=80 * frames, seed=kw.pop("seed", 7), **kw)


def test_stream_chunks_grow_and_cover_every_frame(engine):
    stream = engine.stream(req(frames=12))
    chunks = list(stream)
    assert [c.frames for c in chunks] == [1, 2, 4, 5]
    assert [c.start_frame for c in chunks] == [0, 1, 3, 7]
    for c in chunks:
        assert c.sample_rate == 24_000
        assert c.pcm.dtype == np.float32
        assert c.pcm.size == c.frames * FRAME
        assert np.isfinite(c.pcm).all()
    assert [c.final for c in chunks] == [False, False, False, True]
    assert stream.stats.frames == 12
    assert stream.stats.stop_reason == "max_frames"
    assert stream.codes.shape == (12, 32)
    assert stream.codes.max() < 2051
    assert stream.stats.time_to_first_audio_s is not None
    assert stream.stats.real_time_factor > 0
    assert stream.stats.queued_s is not None
    assert stream.stats.queued_s <= stream.stats.time_to_first_audio_s
    assert wait_until(lambda: engine.free_slots == engine.max_batch)


def test_chunk_schedule_is_configurable(engine):
    chunks = list(engine.stream(req(frames=7, chunks=ChunkSchedule(first_frames=2, growth=1.0, max_frames=2))))
    assert [c.frames for c in chunks] == [2, 2, 2, 1]


def test_seed_reproduces_and_differs(engine):
    a = engine.synthesize(req(seed=3, frames=6))
    b = engine.synthesize(req(seed=3, frames=6))
    c = engine.synthesize(req(seed=4, frames=6))
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.pcm, b.pcm)
    assert not np.array_equal(a.codes, c.codes)


def test_random_seed_is_reported_and_reproducible(engine):
    first = engine.synthesize(SynthesisRequest("Hi.", max_audio_ms=320))
    again = engine.synthesize(SynthesisRequest("Hi.", max_audio_ms=320, seed=first.stats.seed))
    np.testing.assert_array_equal(first.codes, again.codes)


def test_streamed_audio_equals_whole_clip_decode(engine, tiny_dir):
    result = engine.synthesize(req(frames=10, seed=11))
    codes = torch.from_numpy(result.codes)
    codes = codes * (codes < 2048)  # what the engine hands Mimi
    mimi = codec.load_mimi(tiny_dir)  # a second, non-streaming instance
    with torch.inference_mode():
        whole = mimi.decode(codes.T.unsqueeze(0)).squeeze().numpy()
    assert whole.shape == result.pcm.shape
    np.testing.assert_allclose(result.pcm, whole, atol=1e-4 * max(1.0, np.abs(whole).max()))


def test_context_with_voice_and_user_turn(engine):
    context = (Segment(0, "This is my voice.", tone(1.0)), Segment(1, "Why so slow?", tone(0.6, freq=300)))
    stream = engine.stream(req(context=context, frames=4))
    assert sum(c.frames for c in stream) == 4
    assert stream.stats.prompt_frames > 13 + 8 + 2  # both audio clips and all three texts are in


def test_cancel_frees_the_slot_mid_utterance(engine):
    stream = engine.stream(req(frames=400))
    first = next(stream)
    assert first.frames == 1
    assert engine.free_slots == engine.max_batch - 1
    steps = engine.metrics().steps
    stream.cancel()
    assert wait_until(lambda: engine.free_slots == engine.max_batch)
    assert engine.metrics().steps <= steps + 2  # freed at the next step boundary, not at the end
    assert list(stream) == []  # nothing more after a cancel
    assert stream.stats.stop_reason == "cancelled"
    assert stream.stats.frames < 400


def test_context_manager_closes(engine):
    with engine.stream(req(frames=400)) as stream:
        next(stream)
        assert engine.free_slots == engine.max_batch - 1
    assert wait_until(lambda: engine.free_slots == engine.max_batch)


def test_cancel_from_another_thread_stops_at_a_frame_boundary(engine):
    stream = engine.stream(req(frames=400, chunks=ChunkSchedule(first_frames=1, growth=1.0, max_frames=1)))
    got = []
    worker = threading.Thread(target=lambda: got.extend(stream))
    worker.start()
    while not got:
        time.sleep(0.002)
    stream.cancel()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert wait_until(lambda: stream.stats.stop_reason == "cancelled")
    assert stream.stats.frames < 400
    assert wait_until(lambda: engine.free_slots == engine.max_batch)


def test_async_iteration_and_task_cancellation(engine):
    async def consume(stream, limit=None):
        frames = 0
        async with stream:
            async for chunk in stream:
                frames += chunk.frames
                if limit and frames >= limit:
                    break
        return frames

    async def main():
        assert await consume(engine.stream(req(frames=5))) == 5
        stream = engine.stream(req(frames=400))
        assert await consume(stream, limit=3) >= 3  # consumer leaves early
        for _ in range(3000):
            if stream.stats.stop_reason == "cancelled":
                break
            await asyncio.sleep(0.002)
        assert stream.stats.stop_reason == "cancelled"
        stream = engine.stream(req(frames=400))
        task = asyncio.create_task(consume(stream))
        while stream.stats.frames < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):
            if engine.free_slots == engine.max_batch:
                break
            await asyncio.sleep(0.01)
        assert stream.stats.stop_reason == "cancelled"

    asyncio.run(main())
    assert wait_until(lambda: engine.free_slots == engine.max_batch)


def test_concurrent_streams_match_sequential(engine):
    sequential = [engine.synthesize(req(seed=s, frames=6)).codes for s in (1, 2, 3)]
    results = {}

    def run(s):
        results[s] = engine.synthesize(req(seed=s, frames=6)).codes

    threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for s, codes in zip((1, 2, 3), sequential, strict=True):
        np.testing.assert_array_equal(results[s], codes)
    assert wait_until(lambda: engine.free_slots == engine.max_batch)


def test_codes_beyond_mimi_never_reach_it(engine, monkeypatch):
    real = engine.model.decode_frame

    def with_reserved_ids(last_h, sampling, **kw):
        codes = real(last_h, sampling, **kw)
        codes[:, 5] = 2049
        return codes

    seen = []
    decoder = engine._scheduler.executor.decoder
    real_decode = decoder.decode

    def spy(codes, active=None, **kw):
        seen.append(codes.clone())
        return real_decode(codes, active, **kw)

    monkeypatch.setattr(engine.model, "decode_frame", with_reserved_ids)
    monkeypatch.setattr(decoder, "decode", spy)
    stream = engine.stream(req(frames=3))
    pcm = np.concatenate([c.pcm for c in stream])
    assert pcm.size == 3 * FRAME
    assert np.isfinite(pcm).all()
    assert (stream.codes[:, 5] == 2049).all()  # the model's own history keeps its sample
    assert stream.stats.invalid_codes == 3
    assert all(int(c.max()) < 2048 for c in seen)


def test_all_zero_frame_ends_the_utterance(engine, monkeypatch):
    real = engine.model.decode_frame

    def eos_at_frame_3(last_h, sampling, **kw):
        codes = real(last_h, sampling, **kw)
        return torch.zeros_like(codes) if int(sampling.frame[0]) == 3 else codes

    monkeypatch.setattr(engine.model, "decode_frame", eos_at_frame_3)
    stream = engine.stream(req(frames=20))
    assert sum(c.frames for c in stream) == 3
    assert stream.stats.stop_reason == "eos"
    assert stream.codes.shape == (3, 32)
    assert wait_until(lambda: engine.free_slots == engine.max_batch)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": ""}, "empty"),
        ({"text": "hi", "temperature": 0.0}, "temperature"),
        ({"text": "hi", "topk": 0}, "topk"),
        ({"text": "hi", "max_audio_ms": 10}, r"max_audio_ms must be a number in \[80, 163760\] ms"),
        ({"text": "hi", "max_audio_ms": 200_000}, r"max_audio_ms must be a number in \[80, 163760\] ms"),
        ({"text": "x" * 100_001}, "too long"),
    ],
)
def test_bad_requests(kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        SynthesisRequest(**kwargs)


def test_watermark_request_without_watermarker(engine):
    with pytest.raises(ModelSourceError, match="without one"):
        engine.stream(req(watermark=True))


def test_bad_context_fails_that_request_only(engine):
    stream = engine.stream(req(context=(Segment(1, "hm", np.full(4800, np.nan, dtype=np.float32)),)))
    with pytest.raises(InvalidRequest, match="NaN"):
        next(stream)
    assert stream.stats.stop_reason == "error"
    assert wait_until(lambda: engine.free_slots == engine.max_batch)
    assert sum(c.frames for c in engine.stream(req(frames=2))) == 2

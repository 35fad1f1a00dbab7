"""The scheduler's prefill while others speak: joiners' prompts go in bounded, batched passes between
the speaking stream's frame steps; a row joins the step only once its prompt is in; the KV it leaves
equals one whole prefill; a voice prefix is computed once; cancel and failure during prefill end
only their own request and free its row at once."""

import logging

import pytest
import torch
from engines import load_tiny
from signals import tone, wait_until

from misotts_agents.engine.miso_engine import MisoEngine
from misotts_agents.engine.request import ChunkSchedule, Segment, SynthesisRequest
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.model.config import ModelConfig
from misotts_agents.model.weights import load_model

BUDGET = 16  # positions per pass while someone speaks: the joiners' ~70-position prompts take several
ONE_FRAME = ChunkSchedule(first_frames=1, growth=1.0, max_frames=1)
CONTEXT = (Segment(1, "What the user said before.", tone(4.0, freq=240)),)  # ~60 prompt positions


@pytest.fixture(scope="module")
def chunked(tiny_dir):
    with load_tiny(tiny_dir, max_batch=4, prefill_chunk=BUDGET) as engine:
        yield engine


@pytest.fixture(scope="module")
def whole(tiny_dir):
    with load_tiny(tiny_dir, max_batch=4, prefill_chunk=0) as engine:
        yield engine


class Trace:
    """Records, on the scheduler thread, its prefill passes, frame steps and rows starting to speak."""

    def __init__(self, engine: MisoEngine, monkeypatch, hold_until: int = 0) -> None:
        self.sched = sched = engine._scheduler
        self.events: list[tuple] = []
        run_pass, step, start, prefill = sched._run_pass, sched._step, sched._start_speaking, sched._prefill
        self.released = hold_until == 0

        def traced_pass(chunks, width):
            starts = [(job, job.filled, n) for job, n in chunks]
            self.events.append(("pass", [job.slot for job, _ in chunks], width, [job for job, _ in chunks], starts))
            return run_pass(chunks, width)

        def traced_step(slots):
            self.events.append(("step", list(slots)))
            return step(slots)

        def traced_start(job):
            self.events.append(("start", job.slot, job))
            return start(job)

        def held_prefill():  # until `hold_until` joiners are admitted, so they are prefilled together
            if not self.released:
                self.released = sum(not j.speaking for j in sched.running.values()) >= hold_until
            if self.released:
                prefill()

        monkeypatch.setattr(sched, "_run_pass", traced_pass)
        monkeypatch.setattr(sched, "_step", traced_step)
        monkeypatch.setattr(sched, "_start_speaking", traced_start)
        monkeypatch.setattr(sched, "_prefill", held_prefill)

    def passes_of(self, job):
        return [e for e in self.events if e[0] == "pass" and any(j is job for j in e[3])]

    def started(self, job) -> int | None:
        for i, e in enumerate(self.events):
            if e[0] == "start" and e[2] is job:
                return i
        return None

    def jobs(self):
        return [e[2] for e in self.events if e[0] == "start"]


SPEAKERS = []  # cancelled after each test, whatever it asserted


@pytest.fixture(autouse=True)
def silence_speakers():
    yield
    while SPEAKERS:
        SPEAKERS.pop().cancel()


def speaker(engine):
    stream = engine.stream(SynthesisRequest("I keep on talking.", seed=1, chunks=ONE_FRAME, max_audio_ms=80 * 500))
    SPEAKERS.append(stream)
    next(stream)  # speaking: its row is in every frame step from now on
    return stream


def joiner(text: str, **kwargs) -> SynthesisRequest:
    return SynthesisRequest(text, context=CONTEXT, chunks=ONE_FRAME, max_audio_ms=80 * 3, **kwargs)


def finish(engine, *streams):
    for s in streams:
        s.cancel()
    assert wait_until(lambda: engine.free_slots == engine.max_batch, 30)


def test_joiners_prefill_in_bounded_batched_passes_between_the_speakers_steps(chunked, monkeypatch):
    talking = speaker(chunked)
    trace = Trace(chunked, monkeypatch, hold_until=2)
    streams = [chunked.stream(joiner(t, seed=i)) for i, t in enumerate(["First reply.", "Second one here."])]
    assert [sum(c.frames for c in s) for s in streams] == [3, 3]
    jobs = [e[3][0] for e in trace.events if e[0] == "pass"]
    joiners = list(dict.fromkeys(j for j in jobs if j.stream in streams))  # in order of first pass
    assert len(joiners) == 2
    for job in joiners:
        begin, start = trace.events.index(trace.passes_of(job)[0]), trace.started(job)
        assert start is not None
        assert len(trace.passes_of(job)) > 1  # the prompt went in several chunks
        window = trace.events[begin:start]
        # no frame step touched the row before its prompt was in; the speaker stepped throughout
        assert not any(e[0] == "step" and job.slot in e[1] for e in window)
        passes = [e for e in window if e[0] == "pass"]
        assert sum(e[0] == "step" for e in window) >= len(passes) - 1
    widths = [(len(e[1]), e[2]) for e in trace.events if e[0] == "pass"]
    assert all(rows * width <= BUDGET for rows, width in widths)
    assert any(rows > 1 for rows, _ in widths)  # joiners shared passes
    finish(chunked, talking)


def test_chunked_prefill_leaves_the_kv_of_one_whole_prefill(chunked, tiny_dir, monkeypatch):
    talking = speaker(chunked)
    trace = Trace(chunked, monkeypatch, hold_until=2)
    streams = [chunked.stream(joiner(t, seed=i)) for i, t in enumerate(["Checking now.", "One more, please."])]
    for s in streams:
        list(s)
    finish(chunked, talking)  # idle: the finished rows keep their prompts' KV until reused
    reference = load_model(tiny_dir / "model.safetensors", ModelConfig.load(tiny_dir / "config.json"), progress=False)
    reference.setup_caches(1)
    joined = [job for job in trace.jobs() if job.stream in streams]
    assert len(joined) == 2
    assert all(len(trace.passes_of(job)) > 1 for job in joined)
    with torch.inference_mode():
        for job in joined:
            end = job.prefill_end
            tokens, mask = job.prompt.tokens[None, :end], job.prompt.mask[None, :end]
            reference.backbone_last_hidden(tokens, mask, torch.arange(end)[None], torch.tensor([0]))
            for ours, ref in zip(chunked.model.backbone.layers, reference.backbone.layers, strict=True):
                for a, b in ((ours.attn.k_cache, ref.attn.k_cache), (ours.attn.v_cache, ref.attn.v_cache)):
                    torch.testing.assert_close(a[job.slot, :, :end], b[0, :, :end], rtol=1e-5, atol=1e-5)


def test_two_joiners_with_one_new_voice_compute_its_prefix_once(chunked, monkeypatch):
    talking = speaker(chunked)
    voice = VoicePrompt(0, "A brand new voice.", tone(1.5, freq=150))
    trace = Trace(chunked, monkeypatch, hold_until=2)
    streams = [chunked.stream(joiner(t, voice=voice, seed=i)) for i, t in enumerate(["Hello.", "Hi there."])]
    assert [sum(c.frames for c in s) for s in streams] == [3, 3]
    joined = [job for job in trace.jobs() if job.stream in streams]
    prefix = joined[0].prompt.prefix_len
    assert len(joined) == 2
    assert prefix == joined[1].prompt.prefix_len > 0
    chunks = [(job, start, n) for e in trace.events if e[0] == "pass" for job, start, n in e[4]]
    computing = {id(job) for job, start, _ in chunks if start < prefix}
    assert len(computing) == 1  # one computed the voice's positions; the other copied them
    (copier,) = [job for job in joined if id(job) not in computing]
    assert min(start for job, start, _ in chunks if job is copier) == prefix
    assert chunked.voices.get(voice.key).kv is not None
    finish(chunked, talking)


def test_cancel_during_prefill_frees_the_row_at_once(chunked, monkeypatch):
    talking = speaker(chunked)
    trace = Trace(chunked, monkeypatch)
    leaving = chunked.stream(joiner("I will be gone before I speak."))
    real = chunked._scheduler._run_pass

    def cancel_after_first_pass(chunks, width):
        real(chunks, width)
        leaving.cancel()  # arrives while its prompt is half in

    monkeypatch.setattr(chunked._scheduler, "_run_pass", cancel_after_first_pass)
    cancelled_before = chunked.metrics().cancelled
    assert list(leaving) == []
    assert wait_until(lambda: chunked.free_slots == chunked.max_batch - 1, 10)  # only the speaker's row
    assert chunked.metrics().cancelled == cancelled_before + 1
    assert leaving.stats.stop_reason == "cancelled"
    assert trace.jobs() == []  # it never reached the frame step
    finish(chunked, talking)


def test_a_failure_during_prefill_fails_only_its_request(chunked, monkeypatch, caplog):
    talking = speaker(chunked)
    sched = chunked._scheduler
    bad = joiner("This prompt breaks the model.", seed=3)
    real = chunked.model.backbone_last_hidden
    batched_with_bad = []

    def breaks_on_bad(tokens, mask, pos, rows=None, length=None):
        if tokens.size(1) > 1 and rows is not None:
            requests = [sched.running[r].stream.request for r in rows.tolist() if r in sched.running]
            if any(r is bad for r in requests):
                batched_with_bad.append(len(requests))
                raise RuntimeError("simulated prefill failure")
        return real(tokens, mask, pos, rows, length)

    monkeypatch.setattr(chunked.model, "backbone_last_hidden", breaks_on_bad)
    Trace(chunked, monkeypatch, hold_until=2)
    failed_before = chunked.metrics().failed
    with caplog.at_level(logging.WARNING, logger="misotts_agents.engine.scheduler"):
        doomed = chunked.stream(bad)
        fine = chunked.stream(joiner("This one is fine.", seed=4))
        with pytest.raises(RuntimeError, match="simulated prefill failure"):
            list(doomed)
        assert sum(c.frames for c in fine) == 3
    assert batched_with_bad[0] == 2
    assert batched_with_bad[-1] == 1  # the batched pass, then it alone
    assert chunked.metrics().failed == failed_before + 1
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)  # with its traceback
    assert wait_until(lambda: chunked.free_slots == chunked.max_batch - 1, 10)  # the speaker goes on
    finish(chunked, talking)


def test_whole_prompt_schedule_prefills_one_request_per_iteration(whole, monkeypatch):
    talking = speaker(whole)
    trace = Trace(whole, monkeypatch, hold_until=2)
    streams = [whole.stream(joiner(t, seed=i)) for i, t in enumerate(["Alpha.", "Beta gamma."])]
    assert [sum(c.frames for c in s) for s in streams] == [3, 3]
    joined = [job for job in trace.jobs() if job.stream in streams]
    for job in joined:
        (one,) = trace.passes_of(job)
        assert one[1] == [job.slot]
        assert one[2] == job.prefill_end  # the whole prompt, alone
    first, second = (trace.events.index(trace.passes_of(job)[0]) for job in joined)
    assert any(e[0] == "step" for e in trace.events[first:second])  # a frame step between them
    finish(whole, talking)


def test_a_bad_budget_is_refused_before_loading(tiny_dir):
    with pytest.raises(ValueError, match="prefill_chunk"):
        load_tiny(tiny_dir, prefill_chunk=-5)

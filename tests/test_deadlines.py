"""Prefill by playout deadline: a speaking stream far ahead of its listener lends the device to
joiners; one with no slack (or no audio yet) is never delayed beyond the budget's own share; no
pass is sized to take a stream's slack below the floor."""

from types import SimpleNamespace

import pytest
from engines import load_tiny
from test_scheduler_prefill import ONE_FRAME, Trace, finish, joiner

from misotts_agents.audio import FRAME_S
from misotts_agents.engine.deadline import LEND_SHARE, SLACK_FLOOR_S, lendable_s, prefill_allowance_s, slack_s
from misotts_agents.engine.prefill import ITERATION_TARGET_S, MAX_PASS_POSITIONS, MIN_AUTO_POSITIONS, PrefillBudget
from misotts_agents.engine.request import SynthesisRequest


def listener(delivered_frames, played_s, to_next=1, first=0.0):
    return SimpleNamespace(
        first_chunk_at=first,
        delivered_frames=delivered_frames,
        frames_to_next_chunk=to_next,
        played_s=lambda now: played_s,
    )


def test_slack_is_audio_in_hand_less_the_time_to_the_next_chunk():
    assert slack_s(listener(25, 1.0, to_next=4), now=5.0, step_s=0.05) == pytest.approx(2.0 - 1.0 - 0.2)
    assert slack_s(SimpleNamespace(first_chunk_at=None), now=5.0, step_s=0.05) is None


def test_allowance_is_the_smallest_slack_above_the_floor():
    ahead, behind = listener(50, 1.0), listener(20, 1.5)  # 3.0 s and 0.1 s ahead (less one 50 ms step)
    lendable = 4.0 - 1.0 - 0.05 - SLACK_FLOOR_S
    assert prefill_allowance_s(lendable_s([ahead], 0.0, 0.05)) == pytest.approx(LEND_SHARE * lendable)
    assert prefill_allowance_s(lendable_s([ahead, behind], 0.0, 0.05)) == 0.0  # 0.05 s in hand: below the floor
    assert (
        prefill_allowance_s(lendable_s([ahead, SimpleNamespace(first_chunk_at=None)], 0.0, 0.05)) == 0.0
    )  # no audio yet
    assert prefill_allowance_s(lendable_s([], 0.0, 0.05)) == float("inf")


def test_the_budget_stretches_to_the_allowance_and_no_further():
    budget = PrefillBudget("auto")
    budget.observe_step(0.010)
    budget.observe_pass(1000, 0.100)  # 0.1 ms per position
    share = budget.positions(speaking=True)
    assert share == int((ITERATION_TARGET_S - 0.010) / 1e-4)
    assert budget.positions(speaking=True, allowance_s=0.0) == share
    assert budget.positions(speaking=True, allowance_s=0.2) == 2000
    assert budget.positions(speaking=True, allowance_s=100.0) == MAX_PASS_POSITIONS
    assert budget.cost_s(2000) == pytest.approx(0.2)
    fixed = PrefillBudget(32)
    assert fixed.positions(speaking=True, allowance_s=100.0) == 32  # a fixed chunk stays fixed


def test_a_step_near_the_frame_leaves_prefill_only_the_slack():
    """A 70 ms step leaves 10 ms of an 80 ms frame: the budget's own share is the least pass (it
    would take the streams below real time), the slack decides the rest; a 90 ms step overruns the
    frame whatever prefill does, so joiners get one step's time."""
    near = PrefillBudget("auto")
    near.observe_step(0.070)
    near.observe_pass(1000, 0.100)
    assert near.positions(speaking=True) == MIN_AUTO_POSITIONS
    assert near.positions(speaking=True, allowance_s=0.05) == 500
    over = PrefillBudget("auto")
    over.observe_step(0.090)
    over.observe_pass(1000, 0.100)
    assert over.positions(speaking=True) == pytest.approx(900, abs=1)


class FakeBudget(PrefillBudget):
    """The budget's own share is ``share`` positions per iteration (its first pass); the allowance
    buys one position per ``per_position_s``."""

    def __init__(self, share=8, per_position_s=1e-3):
        super().__init__("auto")
        self.share, self.per_position_s = share, per_position_s
        self.allowances = []

    @property
    def step_s(self):
        return 0.0

    def cost_s(self, positions, context=0.0):
        return positions * self.per_position_s

    def positions(self, speaking, filled=0, allowance_s=0.0, share=True):
        if not speaking:
            return MAX_PASS_POSITIONS
        self.allowances.append(allowance_s)
        return self.share * share + int(allowance_s / self.per_position_s)


@pytest.fixture(scope="module")
def auto(tiny_dir):
    with load_tiny(tiny_dir, max_batch=4) as engine:
        yield engine


def talking_with(engine, playout):
    stream = engine.stream(SynthesisRequest("I keep on talking.", seed=1, chunks=ONE_FRAME, max_audio_ms=80 * 500))
    for _ in range(10):  # 10 frames handed out
        next(stream)
    stream.playout = lambda: playout(stream)
    return stream


def joiner_passes(engine, monkeypatch, playout):
    budget = FakeBudget()
    monkeypatch.setattr(engine._scheduler, "prefill_budget", budget)
    talking = talking_with(engine, playout)
    trace = Trace(engine, monkeypatch)
    joining = engine.stream(joiner("Here I come."))
    assert sum(c.frames for c in joining) == 3
    job = trace.jobs()[-1]
    passes = trace.passes_of(job)
    steps_between = [e for e in trace.events[trace.events.index(passes[0]) : trace.started(job)] if e[0] == "step"]
    finish(engine, talking)
    return passes, steps_between, budget.allowances


def test_a_stream_far_ahead_of_its_listener_lends_the_device_to_a_joiner(auto, monkeypatch):
    """Its listener has played nothing of 10 frames: 0.8 s in hand; three quarters of it above the
    floor buy the joiner's ~70-position prompt in one pass (8 positions + 0.48 s at 1 ms each)."""
    passes, _steps, allowances = joiner_passes(auto, monkeypatch, lambda s: 0.0)
    assert len(passes) == 1
    assert max(allowances) > 0.4


def test_a_stream_without_slack_is_delayed_by_no_more_than_the_budgets_share(auto, monkeypatch):
    """Its listener has played everything delivered: every pass is the budget's own share, one per
    frame step of the speaker."""
    passes, steps, allowances = joiner_passes(auto, monkeypatch, lambda s: s.delivered_frames * FRAME_S)
    assert set(allowances) == {0.0}
    assert len(passes) > 5
    assert all(p[2] <= 8 for p in passes)
    assert len(steps) >= len(passes) - 1


def test_prefill_never_spends_a_streams_slack_below_the_floor(auto, monkeypatch):
    """0.3 s in hand: each iteration's passes cost at most what the allowance (slack less the floor,
    itself less the next chunk's step) and the share give, and the allowance shrinks as they run."""
    passes, _steps, allowances = joiner_passes(
        auto, monkeypatch, lambda s: s.delivered_frames * FRAME_S - 0.3 if s.delivered_frames else 0.0
    )
    assert all(a <= LEND_SHARE * (0.3 - SLACK_FLOOR_S) + 1e-6 for a in allowances)
    assert all(p[2] <= 8 + (0.3 - SLACK_FLOOR_S) / 1e-3 for p in passes)


def test_the_slack_is_spent_within_one_iteration_a_pass_at_a_time(auto, monkeypatch):
    """A listener with all of 10+ frames in hand: before the next frame step, each pass takes three
    quarters of the slack the passes before it left, so the iteration spends nearly all of it, and
    never more, before any joiner becomes a speaker with no audio in hand."""
    budget = FakeBudget(share=0, per_position_s=1e-2)  # the slack alone, 10 ms a position
    monkeypatch.setattr(auto._scheduler, "prefill_budget", budget)
    talking = talking_with(auto, lambda s: 0.0)
    trace = Trace(auto, monkeypatch)
    joining = auto.stream(joiner("Here I come, with a somewhat longer sentence than before."))
    assert sum(c.frames for c in joining) == 3
    first = next(i for i, e in enumerate(trace.events) if e[0] == "pass")
    step = next(i for i, e in enumerate(trace.events) if e[0] == "step" and i > first)
    widths = [e[2] for e in trace.events[first:step] if e[0] == "pass"]
    lent = budget.allowances[: len(widths) + 1]  # the last one stopped the iteration
    finish(auto, talking)
    assert len(widths) >= 3
    lendable = lent[0] / LEND_SHARE  # the slack above the floor when the iteration began (less microseconds)
    assert lendable > 0.6
    for k in range(len(widths)):
        assert lent[k + 1] == pytest.approx(LEND_SHARE * (lendable - 1e-2 * sum(widths[: k + 1])), abs=1e-4)
    assert 1e-2 * sum(widths) <= lendable

"""Chunked, batched prefill (engine/prefill.py): the plan of a pass, the budget's policy, and that a
prompt prefilled in chunks, several rows per pass, leaves the same KV entries as one whole prefill."""

import pytest
import torch

from misotts_agents.audio import FRAME_S
from misotts_agents.engine.prefill import (
    FIRST_AUTO_POSITIONS,
    ITERATION_TARGET_S,
    MAX_PASS_POSITIONS,
    MIN_AUTO_POSITIONS,
    Candidate,
    PrefillBudget,
    context_scale,
    parse_prefill_chunk,
    pass_inputs,
    plan_pass,
)
from misotts_agents.model.config import MAX_SEQ_LEN, MISOTTS_8B
from misotts_agents.testing.tiny import TINY_CONFIG, random_model


def cand(key, remaining, filled=0, stop=None, order=0):
    end = filled + remaining
    return Candidate(key, filled, end if stop is None else stop, remaining, order)


def chunks(plan):
    return [(c.key, n) for c, n in plan[0]], plan[1]


def test_a_lone_prompt_goes_whole_when_the_budget_allows():
    assert chunks(plan_pass([cand("a", 1800)], MAX_PASS_POSITIONS, MAX_SEQ_LEN)) == ([("a", 1800)], 1800)
    assert chunks(plan_pass([cand("a", 1800)], None, MAX_SEQ_LEN)) == ([("a", 1800)], 1800)


def test_the_budget_cuts_the_first_row_and_keeps_others_out():
    plan = plan_pass([cand("a", 1800, order=0), cand("b", 1800, order=1)], 256, MAX_SEQ_LEN)
    assert chunks(plan) == ([("a", 256)], 256)


def test_equal_remainders_share_a_pass_within_the_budget():
    rows = [cand(k, 100, order=i) for i, k in enumerate("abcd")]
    assert chunks(plan_pass(rows, 256, MAX_SEQ_LEN)) == ([("a", 100), ("b", 100)], 100)
    assert chunks(plan_pass(rows, 400, MAX_SEQ_LEN)) == ([(k, 100) for k in "abcd"], 100)


def test_shortest_remaining_first_and_the_long_one_fills_the_rest():
    rows = [cand("long", 1800, order=0), cand("short", 60, order=1)]
    plan, width = plan_pass(rows, 256, MAX_SEQ_LEN)
    assert [(c.key, n) for c, n in plan] == [("short", 60), ("long", 128)]
    assert width * len(plan) <= 256  # the padded cost stays within the budget


def test_ties_go_in_arrival_order():
    rows = [cand("late", 500, order=5), cand("early", 500, order=2)]
    assert chunks(plan_pass(rows, 500, MAX_SEQ_LEN))[0] == [("early", 500)]


def test_a_chunk_stops_at_the_voice_prefix_end():
    plan, width = plan_pass([cand("v", 900, stop=150)], 4096, MAX_SEQ_LEN)
    assert [(c.key, n) for c, n in plan] == [("v", 150)]
    assert width == 150


def test_padding_never_runs_past_the_cache_end():
    near_end = cand("near", 30, filled=MAX_SEQ_LEN - 40, order=0)  # padded to w it would need w <= 40
    other = cand("other", 300, order=1)
    plan, width = plan_pass([near_end, other], 4096, MAX_SEQ_LEN)
    assert all(c.filled + width <= MAX_SEQ_LEN for c, _ in plan)
    assert dict((c.key, n) for c, n in plan) == {"near": 30, "other": 40}


def test_max_rows_one_is_one_whole_prompt():
    rows = [cand("a", 10, order=0), cand("b", 10, order=1)]
    assert chunks(plan_pass(rows, None, MAX_SEQ_LEN, max_rows=1)) == ([("a", 10)], 10)


@pytest.mark.parametrize("value", [-1, 1.5, "fast", True, [256]])
def test_bad_settings_are_refused(value):
    with pytest.raises(ValueError, match="prefill_chunk"):
        parse_prefill_chunk(value)


@pytest.mark.parametrize(("value", "parsed"), [("auto", "auto"), (None, None), (0, 0), ("0", 0), ("384", 384)])
def test_settings(value, parsed):
    assert parse_prefill_chunk(value) == parsed


def test_whole_prompts_budget():
    budget = PrefillBudget(0)
    assert budget.whole_prompts
    assert budget.positions(speaking=True) is None
    assert PrefillBudget(None).whole_prompts


def test_fixed_budget_applies_while_someone_speaks_only():
    budget = PrefillBudget(128)
    assert budget.positions(speaking=True) == 128
    assert budget.positions(speaking=False) == MAX_PASS_POSITIONS  # nobody to stall


def test_auto_budget_takes_one_step_when_steps_are_slow():
    budget = PrefillBudget("auto")
    assert budget.positions(speaking=True) == FIRST_AUTO_POSITIONS  # nothing measured yet
    budget.observe_step(0.090)
    budget.observe_pass(400, 0.040)  # 0.1 ms per position
    # step 90 ms > the 64 ms target: the pass may take one step (a chunk gap of about two steps)
    assert budget.positions(speaking=True) == pytest.approx(900, abs=1)


def test_one_slow_step_near_the_frame_does_not_hand_prefill_a_whole_step():
    """Steps of 75 ms in an 80 ms frame with one 200 ms outlier: their running mean passes the frame,
    but most steps fit it, so prefill keeps the least pass; only a run of slow steps is an overrun."""
    budget = PrefillBudget("auto")
    budget.observe_pass(1000, 0.100)
    for seconds in [0.075] * 8 + [0.200]:
        budget.observe_step(seconds)
    assert budget.step_s > FRAME_S
    assert not budget.overrun
    assert budget.positions(speaking=True) == MIN_AUTO_POSITIONS
    for _ in range(5):
        budget.observe_step(0.090)
    assert budget.overrun
    assert budget.positions(speaking=True) == pytest.approx(budget.step_s / 1e-4, abs=1)


def test_auto_budget_fills_the_frame_when_steps_are_fast():
    budget = PrefillBudget("auto")
    budget.observe_step(0.020)
    budget.observe_pass(2000, 0.040)
    # the iteration target minus the step: 44 ms of prefill at 20 us per position
    assert budget.positions(speaking=True) == pytest.approx((ITERATION_TARGET_S - 0.020) / 2e-5, abs=1)


def test_auto_budget_finds_the_size_where_fixed_plus_per_position_cost_meets_the_target():
    """A GPU pass costs a fixed weight read plus a per-position part: fed back its own passes'
    times, the budget settles where fixed + per_position * n equals the target."""
    fixed, per_position, step = 0.005, 1e-5, 0.030
    budget = PrefillBudget("auto")
    budget.observe_step(step)
    budget.observe_pass(10, fixed + 10 * per_position)  # a tiny first pass: mostly the fixed cost
    for _ in range(30):
        n = budget.positions(speaking=True)
        budget.observe_pass(n, fixed + n * per_position)
    target = max(step, ITERATION_TARGET_S - step)
    assert budget.positions(speaking=True) == pytest.approx((target - fixed) / per_position, rel=0.02)


def test_auto_budget_is_bounded_both_ways():
    slow = PrefillBudget("auto")
    slow.observe_step(0.001)
    slow.observe_pass(10, 10.0)
    assert slow.positions(speaking=True) == MIN_AUTO_POSITIONS  # joiners always advance
    fast = PrefillBudget("auto")
    fast.observe_step(0.001)
    fast.observe_pass(10, 1e-6)
    assert fast.positions(speaking=True) == MAX_PASS_POSITIONS


# ---------------------------------------------------------------- the KV entries a plan leaves behind


def _prompt(length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = TINY_CONFIG.audio_num_codebooks
    tokens = torch.randint(0, 2048, (length, k + 1), generator=g)
    tokens[:, -1] = torch.randint(0, 128_000, (length,), generator=g)
    mask = torch.rand(length, k + 1, generator=g) < 0.7
    return tokens, mask


@torch.inference_mode()
@pytest.mark.parametrize("budget", [96, 150, 700])
def test_chunked_batched_prefill_matches_whole_prefills(budget):
    """Rows 0..n-1 are prefilled whole, one at a time; rows n..2n-1 by passes planned under
    ``budget`` (several rows per pass, padded, cut into chunks). Every KV entry of every layer
    agrees within fp32 tolerance, including a prompt ending two positions before the cache's end."""
    model = random_model(TINY_CONFIG)
    lengths = [300, 45, 300, MAX_SEQ_LEN - 2]
    n = len(lengths)
    model.setup_caches(2 * n)
    prompts = [_prompt(length, seed) for seed, length in enumerate(lengths)]
    for row, (tokens, mask) in enumerate(prompts):
        pos = torch.arange(tokens.size(0)).unsqueeze(0)
        model.backbone_last_hidden(tokens[None], mask[None], pos, torch.tensor([row]))

    filled = [0] * n
    passes = []
    while any(f < length for f, length in zip(filled, lengths, strict=True)):
        candidates = [
            Candidate(i, filled[i], lengths[i], lengths[i] - filled[i], i) for i in range(n) if filled[i] < lengths[i]
        ]
        plan, width = plan_pass(candidates, budget, MAX_SEQ_LEN)
        assert plan
        assert len(plan) * width <= budget
        tokens, mask, pos = pass_inputs(
            [(prompts[c.key][0], prompts[c.key][1], c.filled, m) for c, m in plan], width, torch.device("cpu")
        )
        model.backbone_last_hidden(tokens, mask, pos, torch.tensor([n + c.key for c, _ in plan]))
        for c, m in plan:
            filled[c.key] += m
        passes.append(len(plan))
    assert max(passes) > 1  # some passes really were batched
    assert len(passes) > n  # and prompts really were cut

    for i, length in enumerate(lengths):
        for layer in model.backbone.layers:
            for cache in (layer.attn.k_cache, layer.attn.v_cache):
                torch.testing.assert_close(cache[n + i, :, :length], cache[i, :, :length], rtol=1e-5, atol=1e-5)


def test_auto_budget_sizes_deep_passes_by_their_attention_cost():
    """A pass deep into a long prompt attends to more positions: with the cost model of
    ``context_scale`` the budget predicts that, so the pass meets its target from the start instead
    of overrunning it until the feedback catches up (the cause of worst-case chunk gaps)."""
    scale, per_unit, step = 300.0, 1e-5, 0.090
    budget = PrefillBudget("auto", context_scale=scale)
    budget.observe_step(step)
    budget.observe_pass(100, 100 * (1 + 50 / scale) * per_unit, context=50)  # a shallow pass teaches the unit cost
    shallow, deep = budget.positions(speaking=True), budget.positions(speaking=True, filled=1500)
    assert shallow is not None
    assert deep is not None
    assert deep < shallow
    # the deep pass, timed by the same cost model, takes the target (one step), not several
    deep_time = deep * (1 + (1500 + deep / 2) / scale) * per_unit
    assert deep_time == pytest.approx(step, rel=0.01)


def test_context_scale_of_the_8b_backbone_makes_attention_a_small_share():
    scale = context_scale(MISOTTS_8B.backbone)
    assert 2000 / scale < 0.1  # ~7%: on the real model the positions' count is what matters

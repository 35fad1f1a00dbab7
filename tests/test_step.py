"""The frame step: shape selection from host-side state, slots addressing cache rows in place,
padding, warm-up capture with one failing shape, and torch.compile == eager."""

import logging
import os
import random

import numpy as np
import pytest
import torch
from engines import load_tiny

from misotts_agents.engine.request import SynthesisRequest
from misotts_agents.engine.step import FrameStepper, HostRows, StepShape, _Captured, bucket_sizes
from misotts_agents.model.config import ModelConfig, WeightFormat
from misotts_agents.model.sampling import SamplingState
from misotts_agents.model.transformer import CacheWindow
from misotts_agents.testing.random_weights import random_model_on
from misotts_agents.testing.tiny import TINY_CONFIG, random_model

TEXTS = ["Compiled or not.", "Same codes.", "Third one."]
K = 32


@pytest.fixture(scope="module")
def model():
    model = random_model(TINY_CONFIG, seed=3)
    model.setup_caches(8)
    return model


def fill_caches(model, value: float) -> None:
    for stack in (model.backbone, model.decoder):
        for layer in stack.layers:
            layer.attn.k_cache.fill_(value)
            layer.attn.v_cache.fill_(value)


def step_inputs(slots: list[int], positions: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = len(slots)
    tokens = torch.zeros(n, 1, K + 1, dtype=torch.long)
    tokens[:, 0, :K] = torch.randint(0, 2048, (n, K), generator=gen)
    mask = torch.ones(n, 1, K + 1, dtype=torch.bool)
    mask[:, 0, K] = False
    sampling = SamplingState.empty(n, "cpu")
    sampling.seed.copy_(torch.arange(n) + seed)
    sampling.topk.fill_(1)
    return torch.tensor(slots), tokens, mask, torch.tensor(positions)[:, None], sampling


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(6) == [1, 2, 4, 6]


def test_shape_selection(model):
    step = FrameStepper(model, 8)
    assert step.shape_for([0], [10], 50) == StepShape(batch=8, attend=1, length=128, candidates=64)
    assert step.shape_for([0, 5], [10, 300], 50) == StepShape(8, 8, 512, 64)
    assert step.shape_for([2], [1900], 64) == StepShape(8, 4, 2048, 64)
    assert step.shape_for([3], [127], 65).candidates == 2051  # a row wants more than 64: the whole vocabulary
    assert step.shape_for([3], [128], 1).length == 256  # position 128 is the 129th
    assert len(step.shapes()) == 4 * 9 * 2  # attend 1, 2, 4, 8 x 9 windows x 2 candidate counts
    bad = [(([8], [0]), "slots"), (([-1], [0]), "slots"), (([0], [2048]), "positions"), (([0, 1], [5]), "one position")]
    for (slots, positions), message in bad:
        with pytest.raises(ValueError, match=message):
            step.shape_for(slots, positions, 1)

    bucketed = FrameStepper(model, 8, buckets=True)
    assert bucketed.shape_for([2], [10], 1) == StepShape(4, 4, 128, 64)
    assert {s.batch for s in bucketed.shapes()} == {1, 2, 4, 8}
    assert all(s.attend == s.batch for s in bucketed.shapes())


def test_every_selectable_shape_is_in_the_warm_up_list(model):
    """What warm-up captures is exactly what the scheduler can ask for: no shape is met first at a request."""
    rng = random.Random(0)
    for buckets in (False, True):
        step = FrameStepper(model, 8, buckets=buckets)
        listed = set(step.shapes())
        seen = set()
        for _ in range(3000):
            slots = rng.sample(range(8), rng.randint(1, 8))
            positions = [rng.randrange(2048) for _ in slots]
            seen.add(step.shape_for(slots, positions, rng.choice([1, 50, 64, 65, 2051])))
        assert seen <= listed
        assert len(seen) > len(listed) // 2


@torch.inference_mode()
def test_slots_are_cache_rows_and_padding_rows_stay_out(model):
    """Slots 1 and 3 write their own cache rows at their positions; padding rows in the step only
    write the scratch position; rows beyond `attend` are never read (NaN there changes nothing)."""
    step = FrameStepper(model, 8)
    fill_caches(model, 3.0)
    rows, tokens, mask, pos, sampling = step_inputs([1, 3], [5, 9])
    codes = step(rows, tokens, mask, pos, sampling, HostRows([1, 3], [5, 9], 1))
    assert codes.shape == (2, K)
    k_cache = model.backbone.layers[0].attn.k_cache
    written = (k_cache != 3.0).any(dim=3).any(dim=1)  # (rows, positions)
    assert written[1].nonzero().flatten().tolist() == [5]
    assert written[3].nonzero().flatten().tolist() == [9]
    for row in (0, 2, 4, 5, 6, 7):  # padding: only the scratch position
        assert written[row].nonzero().flatten().tolist() == [step.scratch_position]
    # Same step again with every row beyond attend (4) poisoned: identical codes.
    for layer in model.backbone.layers:
        layer.attn.k_cache[4:] = float("nan")
        layer.attn.v_cache[4:] = float("nan")
    again = step(rows, tokens, mask, pos, sampling)  # host copies derived from the tensors
    assert torch.equal(again, codes)


@torch.inference_mode()
def test_a_row_gives_the_same_codes_whatever_else_is_in_the_step(model):
    """Fixed batch shape: a row's codes do not depend on which other slots run with it."""
    step = FrameStepper(model, 8)
    fill_caches(model, 0.0)
    rows, tokens, mask, pos, sampling = step_inputs([6], [20], seed=4)
    alone = step(rows, tokens, mask, pos, sampling)
    others = step_inputs([0, 2, 6], [3, 40, 20], seed=4)
    others[1][2], others[2][2] = tokens[0], mask[0]
    for name in ("seed", "topk", "temperature", "frame"):
        getattr(others[4], name)[2] = getattr(sampling, name)[0]
    together = step(*others)
    assert torch.equal(together[2], alone[0])


class _FakeGraph:
    """Stands in for a CUDA graph on CPU: replay runs the step into the static output."""

    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self):
        self.replays += 1
        self.out.copy_(self.fn())


@torch.inference_mode()
def test_warm_up_captures_every_shape_and_one_failure_spares_the_others(model, monkeypatch, caplog):
    step = FrameStepper(model, 4)
    bad = StepShape(4, 1, 128, 64)

    def capture(shape):
        if shape == bad:
            raise RuntimeError("operation not permitted when stream is capturing")
        out = step._run(shape)
        return _Captured(_FakeGraph(lambda: step._run(shape), out), out)

    monkeypatch.setattr(step, "_capture", capture)
    with caplog.at_level(logging.INFO, logger="misotts_agents.engine.step"):
        step.warm_up()
    fill_caches(model, 0.0)  # rows 0 and 1 below start from the same (empty) history
    assert set(step.graphs) == set(step.shapes()) - {bad}
    assert step.eager_shapes == {bad}
    assert any("FAILED" in r.message and r.levelno == logging.ERROR for r in caplog.records)
    assert sum("captured batch" in r.message for r in caplog.records) == len(step.shapes()) - 1  # a line per shape

    # The failed shape runs eagerly; a captured one replays its graph; both give the same codes.
    inputs = step_inputs([0], [7], seed=2)
    eager = step(*inputs)  # slot 0 -> attend 1: the failed shape
    replayed_before = step.graphs[StepShape(4, 2, 128, 64)].graph.replays
    inputs2 = step_inputs([1], [7], seed=2)
    replayed = step(*inputs2)  # slot 1 -> attend 2: captured
    assert step.graphs[StepShape(4, 2, 128, 64)].graph.replays == replayed_before + 1
    assert torch.equal(eager, replayed)


def test_padding_rows_do_not_change_results(engine):
    """Three rows batched give what each gives alone (same step shape, rows independent)."""
    reqs = [SynthesisRequest(t, topk=1, max_audio_ms=320) for t in TEXTS]
    alone = [engine.synthesize(r).codes for r in reqs]
    streams = [engine.stream(r) for r in reqs]
    for s in streams:
        list(s)
    for s, codes in zip(streams, alone, strict=True):
        np.testing.assert_array_equal(s.codes, codes)


@pytest.mark.slow
def test_compiled_step_matches_eager(engine, tiny_dir):
    """The same step with every layer under torch.compile (inductor, CPU, dynamic shapes) gives
    identical greedy codes.

    Slow: compiling takes about a minute on 2 cores; it earns its place because it is the only
    check that the step stays traceable (no data-dependent Python branching, no host syncs) before
    it meets CUDA graphs on a GPU.
    """
    # the same max_batch as the eager session engine, so both run the same step shape
    compiled = load_tiny(tiny_dir, max_batch=engine.max_batch, compile=True)
    try:
        for text in TEXTS[:2]:
            request = SynthesisRequest(text, topk=1, max_audio_ms=400)
            np.testing.assert_array_equal(compiled.synthesize(request).codes, engine.synthesize(request).codes)
    finally:
        compiled.close()
        torch._dynamo.reset()


def test_power_of_two_buckets(tiny_dir):
    bucketed = load_tiny(tiny_dir, max_batch=4, batch_buckets=True)
    try:
        assert bucketed._scheduler.executor.stepper.batch_sizes == [1, 2, 4]
        streams = [bucketed.stream(SynthesisRequest(t, max_audio_ms=240)) for t in TEXTS]
        assert [sum(c.frames for c in s) for s in streams] == [3, 3, 3]
    finally:
        bucketed.close()


# ------------------------------------------------------------------- on a GPU (scripts/gpu_check.sh)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MID_CONFIG = ModelConfig(  # big enough for bf16 rounding to show, small enough to build in a second
    backbone_flavor={"num_layers": 4, "num_heads": 16, "num_kv_heads": 4, "embed_dim": 1024, "intermediate_dim": 2816},
    decoder_flavor={"num_layers": 2, "num_heads": 8, "num_kv_heads": 2, "embed_dim": 512, "intermediate_dim": 1024},
)


def cuda_stepper(
    config: ModelConfig, dtype: torch.dtype, max_batch: int, weights: WeightFormat = "bf16", **options
) -> FrameStepper:
    model = random_model_on(config, "cuda", dtype, seed=5, std=0.05, weights=weights)
    model.setup_caches(max_batch)
    return FrameStepper(model, max_batch, **options)


def run_frames(step: FrameStepper, slots: list[int], start: int, frames: int) -> torch.Tensor:
    """Greedy frames for ``slots`` from position ``start``: each frame's codes are the next input."""
    n = len(slots)
    rows, tokens, mask, _, sampling = (
        t.cuda() if isinstance(t, torch.Tensor) else t for t in step_inputs(slots, [0] * n)
    )
    sampling = SamplingState(**{f: getattr(sampling, f).cuda() for f in ("temperature", "topk", "seed", "frame")})
    out = []
    with torch.inference_mode():
        for i in range(frames):
            positions = [start + i] * n
            pos = torch.tensor(positions, device="cuda")[:, None]
            codes = step(rows, tokens, mask, pos, sampling, HostRows(slots, positions, 1))
            out.append(codes)
            tokens = tokens.clone()
            tokens[:, 0, :K] = codes
            sampling.frame += 1
    return torch.stack(out, dim=1)


@pytest.mark.cuda
@needs_cuda
def test_cuda_every_shape_is_captured_at_start_up():
    step = cuda_stepper(TINY_CONFIG, torch.float32, 4)
    assert step.compiled
    assert step.cuda_graphs
    assert not step.eager_shapes
    assert set(step.graphs) == set(step.shapes())


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_replay_gives_the_eager_codes():
    """The captured graphs replay exactly what the same compiled step computes without them."""
    step = cuda_stepper(TINY_CONFIG, torch.float32, 4)
    replayed = run_frames(step, [0, 2], start=10, frames=6)
    graphs, step.graphs = step.graphs, {}  # the same step, every shape run without its graph
    try:
        eager = run_frames(step, [0, 2], start=10, frames=6)
    finally:
        step.graphs = graphs
    assert torch.equal(replayed, eager)
    assert replayed.unique().numel() > 20  # real, varied codes


@pytest.mark.cuda
@needs_cuda
@torch.inference_mode()
def test_cuda_bf16_agrees_with_fp32():
    """The same weights in bf16 and fp32 (eager, no compile): the backbone's states agree to bf16
    precision after a prefill and a windowed step."""
    fp32 = random_model_on(MID_CONFIG, "cuda", torch.float32, seed=5, std=0.05)
    bf16 = random_model_on(MID_CONFIG, "cuda", torch.bfloat16, seed=5, std=0.05)
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()})
    states = []
    for model in (fp32, bf16):
        model.setup_caches(2)
        gen = torch.Generator(device="cuda").manual_seed(1)
        tokens = torch.randint(0, 2048, (2, 40, K + 1), device="cuda", generator=gen)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        pos = torch.arange(40, device="cuda").expand(2, 40)
        model.backbone_last_hidden(tokens, mask, pos, torch.tensor([0, 1], device="cuda"))
        h = model.backbone_last_hidden(tokens[:, :1], mask[:, :1], pos[:, -1:] + 1, CacheWindow(128))
        states.append(h.float())
    a, b = states
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert (cosine > 0.995).all(), cosine
    assert (a - b).abs().max() <= 0.05 * a.abs().max()


@pytest.mark.cuda
@needs_cuda
def test_cuda_engine_speaks():
    from misotts_agents.testing.random_weights import random_engine

    tokenizer = os.environ.get("MISOTTS_TOKENIZER")
    engine = random_engine("tiny", device="cuda", dtype=torch.bfloat16, tokenizer=tokenizer, max_batch=4)
    try:
        results = [engine.stream(SynthesisRequest(t, seed=i, max_audio_ms=400)) for i, t in enumerate(TEXTS)]
        for stream in results:
            pcm = np.concatenate([c.pcm for c in stream])
            assert pcm.size == 5 * 1920
            assert np.isfinite(pcm).all()
        assert not engine._scheduler.executor.stepper.eager_shapes
    finally:
        engine.close()

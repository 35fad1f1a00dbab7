"""The static frame step: buckets, padding with the scratch row, and torch.compile == eager."""

import numpy as np
import pytest
import torch

from misotts_agents.engine.facade import MisoEngine
from misotts_agents.engine.request import SynthesisRequest
from misotts_agents.engine.step import bucket_sizes

TEXTS = ["Compiled or not.", "Same codes.", "Third one."]


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(6) == [1, 2, 4, 6]


def test_padding_rows_do_not_change_results(engine):
    """Three rows batched (one scratch row) give what each gives alone (three scratch rows)."""
    reqs = [SynthesisRequest(t, topk=1, max_audio_ms=320) for t in TEXTS]
    alone = [engine.synthesize(r).codes for r in reqs]
    streams = [engine.stream(r) for r in reqs]
    for s in streams:
        list(s)
    for s, codes in zip(streams, alone, strict=True):
        np.testing.assert_array_equal(s.codes, codes)


@pytest.mark.slow
def test_compiled_step_matches_eager(engine, tiny_dir):
    """The same static step under torch.compile (inductor, CPU) gives identical greedy codes.

    Slow: compiling the unrolled 32-codebook step takes about a minute on 2 cores; it earns its place
    because it is the only check that the step stays traceable (no data-dependent Python branching,
    no host syncs) before it meets CUDA graphs on a GPU.
    """
    # the same max_batch as the eager session engine, so both run the same step shape
    compiled = MisoEngine.load(
        tiny_dir, device="cpu", watermark=False, max_batch=engine.max_batch, compile=True, progress=False
    )
    try:
        for text in TEXTS[:2]:
            request = SynthesisRequest(text, topk=1, max_audio_ms=400)
            np.testing.assert_array_equal(compiled.synthesize(request).codes, engine.synthesize(request).codes)
    finally:
        compiled.close()
        torch._dynamo.reset()


def test_power_of_two_buckets(tiny_dir):
    bucketed = MisoEngine.load(tiny_dir, device="cpu", watermark=False, max_batch=4, batch_buckets=True, progress=False)
    try:
        assert sorted(bucketed._scheduler.stepper.buckets) == [1, 2, 4]
        streams = [bucketed.stream(SynthesisRequest(t, max_audio_ms=240)) for t in TEXTS]
        assert [sum(c.frames for c in s) for s in streams] == [3, 3, 3]
    finally:
        bucketed.close()

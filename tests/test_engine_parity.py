"""End to end against the torchtune oracle: the engine's greedy codes for a real prompt (a voice
segment and a user turn, both with text and audio) are the reference model's codes."""

import numpy as np
import pytest
import torch
from engines import load_tiny
from oracle import OracleModel
from signals import tone

from misotts_agents.engine.request import Segment, SynthesisRequest

FRAMES = 10


@pytest.fixture(scope="module")
def batch1_engine(tiny_dir):
    """max_batch=1: the step is the reference's batch-1 computation (see step.py on batch shapes)."""
    with load_tiny(tiny_dir, max_batch=1) as engine:
        yield engine


def test_greedy_codes_match_the_oracle(batch1_engine):
    engine = batch1_engine
    context = (
        Segment(0, "This is how I sound.", tone(0.8, freq=180)),
        Segment(1, "Why is this taking so long?", tone(0.5, freq=260)),
    )
    request = SynthesisRequest("Sorry, one moment please.", context=context, topk=1, seed=5, max_audio_ms=80 * FRAMES)
    ours = engine.synthesize(request).codes

    oracle = OracleModel(engine.model.config)
    oracle.load_state_dict(engine.model.state_dict(), strict=True)
    oracle.eval()
    oracle.setup_caches(1)
    prompt = engine.prompts.build(request.text, request.speaker, request.context, request.max_frames)
    with torch.inference_mode():
        expected = oracle.generate_greedy(prompt.tokens, prompt.mask, FRAMES).numpy()

    assert expected.shape == (FRAMES, 32)
    assert len(np.unique(expected)) > 50  # real, varied codes, not a degenerate constant
    np.testing.assert_array_equal(ours, expected)

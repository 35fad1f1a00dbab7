"""The interleaved prompt: layout as the reference builds it, the context budget, bad audio."""

import math
import warnings

import numpy as np
import pytest
import torch
from signals import tone

from misotts_agents.audio import to_mono
from misotts_agents.engine.request import Segment
from misotts_agents.errors import InvalidRequest


def test_layout_of_text_and_audio_segments(engine):
    audio = tone(0.5)
    prompt = engine.prompts.build("Hi there.", 0, [Segment(1, "How are you?", audio)], max_frames=10)
    user_ids = engine.tokenizer.encode("How are you?", 1)
    gen_ids = engine.tokenizer.encode("Hi there.", 0)
    n_audio = math.ceil(audio.size / 1920)
    assert prompt.length == len(user_ids) + n_audio + 1 + len(gen_ids)
    t, m = prompt.tokens, prompt.mask
    # text run: ids in the last column only
    assert t[: len(user_ids), -1].tolist() == user_ids
    assert m[: len(user_ids)].sum(dim=1).tolist() == [1] * len(user_ids)
    # audio run: 32 codes masked in, text column masked out, then the all-zero end frame
    audio_rows = slice(len(user_ids), len(user_ids) + n_audio + 1)
    assert m[audio_rows, :32].all()
    assert not m[audio_rows, 32].any()
    codes = engine._encode_audio(torch.from_numpy(audio))
    assert torch.equal(t[len(user_ids) : len(user_ids) + n_audio, :32], codes.T)
    assert not t[len(user_ids) + n_audio].any()
    assert t[-len(gen_ids) :, -1].tolist() == gen_ids
    assert prompt.dropped_segments == 0


def test_oldest_segments_dropped_with_warning(engine):
    long = tone(8.0)  # 100 audio frames + text per segment
    context = [Segment(i % 2, f"turn {i}", long) for i in range(3)]
    max_frames = 2048 - 250  # room for two of the three segments (about 107 frames each)
    with pytest.warns(UserWarning, match="dropped 1 oldest"):
        prompt = engine.prompts.build("Reply.", 0, context, max_frames=max_frames)
    assert prompt.dropped_segments == 1
    assert prompt.length <= 2048 - max_frames
    # the two newest segments survived: the prompt now starts with turn 1's transcript
    first = engine.tokenizer.encode("turn 1", 1)
    assert prompt.tokens[: len(first), -1].tolist() == first


def test_no_warning_when_it_fits(engine):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.prompts.build("Reply.", 0, [Segment(1, "hello", tone(0.3))], max_frames=100)


def test_text_too_long(engine):
    with pytest.raises(InvalidRequest, match="text too long"):
        engine.prompts.build("word " * 3000, 0, [], max_frames=100)


def test_stereo_and_other_rates_are_converted():
    stereo = np.stack([tone(0.25, 48_000), tone(0.25, 48_000)])
    mono = to_mono(stereo, 48_000)
    assert mono.dtype == np.float32
    assert mono.ndim == 1
    assert mono.size == 6000
    interleaved = to_mono(stereo.T.copy(), 48_000)
    np.testing.assert_allclose(mono, interleaved)
    pcm16 = (tone(0.1, 16_000) * 32767).astype(np.int16)
    assert to_mono(pcm16, 16_000).size == 2400


@pytest.mark.parametrize(
    ("audio", "rate", "message"),
    [
        (np.array([0.1, np.nan, 0.2], dtype=np.float32), 24_000, "NaN or infinite"),
        (np.array([0.1, np.inf], dtype=np.float32), 24_000, "NaN or infinite"),
        (np.zeros(0, dtype=np.float32), 24_000, "empty"),
        (np.zeros((3, 4, 5), dtype=np.float32), 24_000, "shape"),
        (np.zeros((100, 100), dtype=np.float32), 24_000, "channels"),
        (np.zeros(100, dtype=np.float32), 0, "sample rate"),
        (np.array(["a"]), 24_000, "numeric"),
    ],
)
def test_bad_audio_is_a_clear_error(engine, audio, rate, message):
    with pytest.raises(InvalidRequest, match=message):
        engine.prompts.build("Reply.", 0, [Segment(1, "hello", audio, rate)], max_frames=10)


def test_segment_type_checked(engine):
    with pytest.raises(InvalidRequest, match="expected a Segment"):
        engine.prompts.build("Reply.", 0, [("hello", tone(0.1))], max_frames=10)

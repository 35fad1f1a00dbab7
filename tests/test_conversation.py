"""Turn memory: user audio with pre-roll and transcript, agent turns cut at interruptions, bounds."""

import time

import numpy as np
import pytest
from signals import tone

from misotts_agents.audio import to_mono
from misotts_agents.engine.memory import ConversationMemory, cut_text
from misotts_agents.engine.registry import shared_engine


def frames(audio: np.ndarray, rate: int, ms: int = 20):
    step = rate * ms // 1000
    for i in range(0, audio.size, step):
        yield audio[i : i + step]


def test_user_turn_has_pre_roll_audio_and_transcript():
    mem = ConversationMemory(pre_roll_s=0.2)
    for f in frames(tone(1.0, 16_000, 100), 16_000):  # silence-ish before VAD fires
        mem.push_user_audio(f, 16_000)
    mem.user_started_speaking()
    for f in frames(tone(0.6, 16_000, 300), 16_000):
        mem.push_user_audio((f * 32767).astype(np.int16).tobytes(), 16_000)
    mem.add_user_transcript("Where is my order?")  # transcripts can arrive before the stop
    mem.user_stopped_speaking()
    (seg,) = mem.context()
    assert seg.speaker == 1 and seg.text == "Where is my order?" and seg.sample_rate == 24_000
    assert 0.76 <= seg.audio.size / 24_000 <= 0.84  # 0.6 s of speech + 0.2 s of pre-roll (± resampler delay)


def test_no_pre_roll():
    """pre_roll_s=0 keeps no audio from before the user started (the silence is dropped, not an error)."""
    mem = ConversationMemory(pre_roll_s=0)
    for f in frames(tone(0.3, 24_000, 100), 24_000):  # before VAD fires: would feed the pre-roll
        mem.push_user_audio(f, 24_000)
    mem.user_started_speaking()
    mem.push_user_audio(tone(0.5), 24_000)
    mem.user_stopped_speaking()
    mem.add_user_transcript("Hi.")
    (seg,) = mem.context()
    assert seg.audio.size == 12_000  # the speech only


def test_transcript_after_stop_and_in_pieces():
    mem = ConversationMemory()
    mem.user_started_speaking()
    mem.push_user_audio(tone(0.5), 24_000)
    mem.user_stopped_speaking()
    assert mem.context() == ()  # no transcript yet
    mem.add_user_transcript("Hello")
    mem.add_user_transcript("there.")
    (seg,) = mem.context()
    assert seg.text == "Hello there."


def test_stereo_user_audio_is_downmixed():
    mem = ConversationMemory(pre_roll_s=0)
    mem.user_started_speaking()
    stereo = np.stack([tone(0.5, 48_000), tone(0.5, 48_000)], axis=1)
    mem.push_user_audio((stereo * 32767).astype(np.int16).tobytes(), 48_000, num_channels=2)
    mem.user_stopped_speaking()
    mem.add_user_transcript("ok")
    assert abs(mem.context()[0].audio.size - 12_000) <= 960  # 0.5 s, less the stream resampler's delay


def test_agent_turn_cut_at_interruption():
    mem = ConversationMemory()
    mem.agent_started("one two three four five six seven eight nine ten")
    mem.push_agent_audio(np.zeros(24_000 * 4, dtype=np.float32))  # 4 s generated at once
    time.sleep(0.4)  # ... but only ~0.4 s of it was played when the user barged in
    mem.agent_finished(interrupted=True)
    (seg,) = mem.context()
    assert seg.speaker == 0
    assert 0.35 <= seg.audio.size / 24_000 < 1.0
    assert seg.text in ("one", "one two")  # ~10% of the words


def test_agent_turn_kept_whole_when_finished():
    mem = ConversationMemory()
    mem.agent_started("All done.")
    mem.push_agent_audio(tone(0.5))
    mem.agent_finished()
    assert mem.context()[0].text == "All done." and mem.context()[0].audio.size == 12_000


def test_bounded_and_switchable():
    mem = ConversationMemory(max_turns=2, max_turn_s=1.0)
    for i in range(5):
        mem.agent_started(f"turn {i}")
        mem.push_agent_audio(tone(1.0))
        mem.agent_finished()
    ctx = mem.context()
    assert [s.text for s in ctx] == ["turn 3", "turn 4"]
    assert all(s.audio.size == 24_000 for s in ctx)
    mem.enabled = False
    assert mem.context() == ()


def test_long_agent_turn_keeps_its_start_and_the_matching_text():
    mem = ConversationMemory(max_turn_s=1.0)
    mem.agent_started("one two three four")
    mem.push_agent_audio(tone(2.0))  # twice the cap: the first second is kept, and half the words
    mem.agent_finished()
    (seg,) = mem.context()
    assert seg.audio.size == 24_000 and seg.text == "one two"


def test_user_audio_resampled_as_one_stream():
    mem = ConversationMemory(pre_roll_s=0)
    mem.user_started_speaking()
    audio = tone(1.0, 16_000)
    for f in frames(audio, 16_000, ms=10):
        mem.push_user_audio(f, 16_000)
    mem.user_stopped_speaking()
    mem.add_user_transcript("hm")
    whole = to_mono(audio, 16_000)
    got = mem.context()[0].audio
    assert 0 <= whole.size - got.size <= 960  # the stream resampler holds back its last few ms
    n = got.size - 960
    np.testing.assert_allclose(got[960:n], whole[960:n], atol=2e-3)  # no seams at the 10 ms frame edges


def test_shared_engine_key_fills_defaults():
    from misotts_agents.engine.registry import _key

    assert _key("m", {}) == _key("m", {"device": None, "watermark": True})
    assert _key("m", {}) != _key("m", {"max_batch": 2})


def test_cut_text():
    assert cut_text("a b c d", 0.5) == "a b" and cut_text("a b", 1.0) == "a b" and cut_text("a b", 0.0) == ""


def test_bad_user_audio_is_refused():
    mem = ConversationMemory()
    mem.user_started_speaking()
    with pytest.raises(ValueError, match="NaN"):
        mem.push_user_audio(np.array([np.nan, 0.0], dtype=np.float32), 16_000)


def test_shared_engine_is_one_per_model(tiny_dir):
    a = shared_engine(tiny_dir, device="cpu", watermark=False, max_batch=2, progress=False)
    b = shared_engine(tiny_dir, device="cpu", watermark=False, max_batch=2, progress=False)
    assert a is b
    a.close()
    c = shared_engine(tiny_dir, device="cpu", watermark=False, max_batch=2, progress=False)
    assert c is not a and not c.closed
    c.close()

"""Turn memory: user audio with pre-roll and transcript, agent turns cut at interruptions, bounds."""

import itertools
import time

import numpy as np
import pytest
from signals import tone

from misotts_agents.audio import to_mono
from misotts_agents.engine.memory import ConversationMemory
from misotts_agents.engine.playout import PlayoutClock
from misotts_agents.engine.registry import shared_engine
from misotts_agents.engine.request import AudioChunk, Segment
from misotts_agents.engine.words import CHARS_PER_S, WordAligner, WordTiming, split_for_length


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
    assert seg.speaker == 1
    assert seg.text == "Where is my order?"
    assert seg.sample_rate == 24_000
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
    assert mem.context()[0].text == "All done."
    assert mem.context()[0].audio.size == 12_000


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
    mem.push_agent_audio(tone(2.0))  # twice the cap: the first second is kept, and the words started in it
    mem.agent_finished()
    (seg,) = mem.context()
    # (no word timings came: estimated over the 2 s by length, 4:4:6:5 -> starts 0, 0.42, 0.84, 1.47 s)
    assert seg.audio.size == 24_000
    assert seg.text == "one two three"


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
    assert c is not a
    assert not c.closed
    c.close()


# -- word timings -----------------------------------------------------------------------------------


def test_words_are_spread_by_length_and_handed_out_once_in_order():
    aligner = WordAligner("Sure thing. Your order ships today.")
    got = []
    for k in range(1, 30):  # 80 ms chunks, the sentence still going
        got += aligner.advance(k * 0.08)
    assert [w.word for w in got] == ["Sure", "thing.", "Your", "order", "ships"]  # the last is held back
    starts = [w.start_s for w in got]
    assert starts == sorted(starts)
    assert starts[0] == 0.0
    # by length at the prior rate while the audio is short of it: "thing." after "Sure " (5 characters)
    assert abs(got[1].start_s - 5 / CHARS_PER_S) < 1e-9
    assert all(w.start_s < k_end for w, k_end in zip(got, [0.08, 0.4, 0.88, 1.28, 1.68], strict=True))
    # end of speech at 3.0 s: the rest placed by its share of the real length, never before a word given
    (last,) = aligner.advance(3.0, ended=True)
    assert last.word == "today."
    assert last.end_s == 3.0
    assert got[-1].start_s <= last.start_s < 3.0
    assert aligner.advance(3.2, ended=True) == ()


def test_a_sentence_cut_by_its_limit_hands_out_only_the_words_started():
    aligner = WordAligner("one two three four five six")
    words = aligner.advance(0.8)  # the limit came at 0.8 s (the final chunk, but not end of speech)
    assert [w.word for w in words] == ["one", "two", "three"]
    assert aligner.remaining == 3


def test_end_of_speech_sooner_than_expected_refines_the_timings():
    aligner = WordAligner("one two three four five six")  # ~2.1 s at the prior rate
    first = aligner.advance(0.08)
    rest = aligner.advance(1.0, ended=True)  # but it was said in 1 s
    words = [*first, *rest]
    assert [w.word for w in words] == ["one", "two", "three", "four", "five", "six"]
    assert all(a.start_s <= b.start_s for a, b in itertools.pairwise(words))
    assert rest[-1].end_s == 1.0
    assert abs(rest[0].start_s - 4 / 28 * 1.0) < 1e-9  # "two" at its share (after "one ": 4 of 28) of 1 s


def test_long_text_is_split_at_clauses_then_words():
    text = "When it arrives, and it will arrive soon, please check the box; then call us back right away."
    parts = split_for_length(text, 2.5)
    assert " ".join(parts) == text
    assert len(parts) == 4
    assert all(p.endswith((",", ";", ".")) for p in parts)
    assert split_for_length("Short one.", 2.0) == ["Short one."]
    run_on = " ".join(["word"] * 40)  # no clause boundary at all: between words
    assert all(len(p) / CHARS_PER_S <= 2.0 for p in split_for_length(run_on, 2.0))


def test_playout_clock_ahead_and_behind():
    now = [0.0]
    clock = PlayoutClock(lambda: now[0])
    assert clock.push(2.0) == 0.0  # generation far ahead: 2 s handed over at once
    now[0] = 0.5
    assert clock.heard_s() == 0.5
    assert clock.push(0.5) == 2.0  # queued behind the first 2 s
    now[0] = 4.0  # the player ran dry at 2.5 s: the next audio plays when it comes
    assert clock.heard_s() == 2.5
    assert clock.push(0.08) == 4.0
    now[0] = 4.04
    assert abs(clock.heard_s() - 2.54) < 1e-9


def chunk_words(text: str, seconds: float, chunk_s: float = 0.16) -> list[tuple[np.ndarray, tuple]]:
    """Chunks of ``seconds`` of audio with their words, as the engine streams a sentence that ends."""
    aligner = WordAligner(text)
    n = round(seconds / chunk_s)
    return [(tone(chunk_s), aligner.advance((k + 1) * chunk_s, ended=k == n - 1)) for k in range(n)]


def test_interrupted_turn_keeps_the_words_heard_when_generation_is_ahead():
    now = [0.0]
    mem = ConversationMemory()
    mem.clock = lambda: now[0]
    said = "one two three four five six seven eight"
    mem.agent_started(said)
    timed = [(pcm, words) for pcm, words in chunk_words(said, 3.2)]
    for pcm, words in timed:  # all 3.2 s generated at once
        mem.push_agent_audio(pcm, words)
    now[0] = 1.0  # the user barges in after 1 s of playback
    mem.agent_finished(interrupted=True)
    (turn,) = mem.context()
    heard = [w.word for _, words in timed for w in words if w.start_s < 1.0]
    assert turn.audio.size == 24_000
    assert turn.text == " ".join(heard)
    assert 0 < len(heard) < 8


def test_interrupted_turn_keeps_the_words_heard_when_generation_is_behind():
    """Generation slower than playback: everything generated was heard, but only the words generated
    so far (the rest of the sentence was never said): not the whole sentence's text."""
    now = [0.0]
    mem = ConversationMemory()
    mem.clock = lambda: now[0]
    said = "Sure thing. Your order ships today."
    mem.agent_started(said)
    aligner = WordAligner(said)
    for k in range(8):  # 0.64 s of a ~2.6 s sentence, one 80 ms chunk every 0.12 s
        now[0] = 0.12 * k
        mem.push_agent_audio(tone(0.08), aligner.advance((k + 1) * 0.08))
    now[0] = 0.12 * 8
    mem.agent_finished(interrupted=True)
    (turn,) = mem.context()
    assert turn.audio.size == 8 * 1920  # all of it played (the player waited for each chunk)
    assert turn.text == "Sure thing."
    assert aligner.remaining == 4


def test_explicit_heard_position_and_two_sentences():
    mem = ConversationMemory()
    mem.agent_started()
    for text in ("One two.", "Three four."):
        mem.agent_add_text(text)
        for pcm, words in chunk_words(text, 0.64):
            mem.push_agent_audio(pcm, words)
    mem.agent_finished(interrupted=True, heard_s=0.64 + 0.1)  # the framework says: 0.74 s played
    (turn,) = mem.context()
    assert turn.audio.size == round(0.74 * 24_000)
    assert turn.text == "One two. Three"


def test_only_an_interruption_cuts_and_a_user_turn_meanwhile_comes_after():
    now = [0.0]
    mem = ConversationMemory(pre_roll_s=0)
    mem.clock = lambda: now[0]
    mem.agent_started("A reply the user talks over.")
    mem.push_agent_audio(tone(2.0), (WordTiming("A", 0.0, 0.1),))
    now[0] = 0.5  # interruptions off: the user speaks while the reply plays on
    mem.user_started_speaking()
    mem.push_user_audio(tone(0.4), 24_000)
    mem.user_stopped_speaking()
    mem.add_user_transcript("Hm.")
    assert mem.context() == ()  # the user's turn waits for the reply's
    mem.agent_add_text("More of it.")
    mem.push_agent_audio(tone(1.0))
    mem.agent_finished()  # played out (the next reply starts): kept whole
    agent, user = mem.context()
    assert agent.audio.size == 3 * 24_000
    assert agent.text.startswith("A")
    assert agent.text.endswith("More of it.")
    assert (user.speaker, user.text) == (1, "Hm.")


def test_user_resampler_is_flushed_at_the_end_of_each_turn():
    mem = ConversationMemory(pre_roll_s=0)
    for text in ("first", "second"):
        mem.user_started_speaking()
        for f in frames(tone(0.6, 16_000), 16_000):
            mem.push_user_audio(f, 16_000)
        mem.user_stopped_speaking()
        mem.add_user_transcript(text)
    first, second = mem.context()
    assert first.audio.size == second.audio.size == round(0.6 * 24_000)  # each turn whole, none spilled


def test_preflight_transcript_conditions_a_reply_before_the_turn_ends():
    mem = ConversationMemory(pre_roll_s=0)
    mem.user_started_speaking()
    mem.push_user_audio(tone(0.5), 24_000)
    assert mem.context() == ()  # nothing known yet
    mem.user_preflight_transcript("Where is")
    (pending,) = mem.context()
    assert (pending.speaker, pending.text, pending.audio.size) == (1, "Where is", 12_000)
    mem.add_user_transcript("Where is my order?")
    mem.user_preflight_transcript()  # the finals are all there is so far
    mem.push_user_audio(tone(0.1), 24_000)
    assert mem.context()[0].text == "Where is my order?"
    assert mem.context()[0].audio.size == 14_400
    mem.user_stopped_speaking()  # committed: the turn itself, once
    (turn,) = mem.context()
    assert turn.text == "Where is my order?"
    assert turn.audio.size == 14_400


class _EngineStream:
    """Chunks of 80 ms with their words, as the engine streams a sentence still being generated; the
    clock moves ``step_s`` per chunk (generation speed)."""

    def __init__(self, text: str, now: list[float], step_s: float) -> None:
        self.aligner, self.now, self.step_s, self.k = WordAligner(text), now, step_s, 0

    def cancel(self) -> None:
        pass

    async def __anext__(self):
        self.now[0] += self.step_s
        self.k += 1
        return AudioChunk(tone(0.08), self.k - 1, 1, False, words=self.aligner.advance(self.k * 0.08))


@pytest.mark.parametrize(("step_s", "chunks", "barge_at", "heard_s"), [(0.0, 30, 0.5, 0.5), (0.12, 8, 1.04, 0.64)])
def test_server_session_turn_is_cut_by_the_words_heard(step_s, chunks, barge_at, heard_s):
    """A server session's agent turn (SessionStream), cancelled when the listener barges in: audio and
    words as far as they were heard, generation ahead of playback (all at once, cancelled 0.5 s in)
    or behind it (a chunk every 0.12 s, the last played out by 1.04 s: all of it was heard, and only
    the words generated)."""
    import asyncio

    from misotts_agents.server.sessions import SessionStream

    now = [0.0]
    mem = ConversationMemory()
    mem.clock = lambda: now[0]
    said = "Sure thing. Your order ships today, and it should arrive by Friday."
    mem.agent_started(said)
    engine_stream = _EngineStream(said, now, step_s)
    stream = SessionStream(engine_stream, mem, more=False)

    async def listen() -> list[AudioChunk]:
        return [await stream.__anext__() for _ in range(chunks)]

    got = asyncio.run(listen())
    now[0] = barge_at
    stream.cancel()
    (turn,) = mem.context()
    words = [w for c in got for w in c.words if w.start_s < heard_s]
    assert turn.audio.size == round(heard_s * 24_000)
    assert turn.text == " ".join(w.word for w in words)
    assert said.startswith(turn.text)
    assert turn.text != said


def test_reply_context_is_the_turns_then_the_reply_so_far():
    """What a reply's next sentence hears: the turns (the memory's, or the caller's), then the reply so
    far (the open agent turn, or the caller's own record of it), the last ``max_turns`` of them."""
    mem = ConversationMemory()
    mem.add_turn(1, "Where is my order?", tone(0.5))
    assert mem.reply_context() == mem.context()  # no reply open
    mem.agent_started("It ships today.")
    mem.push_agent_audio(tone(0.4))
    turn, current = mem.reply_context()
    assert (turn.text, current.text) == ("Where is my order?", "It ships today.")
    assert [s.text for s in mem.reply_context(reply=())] == ["Where is my order?"]
    assert [s.text for s in mem.reply_context(turns=())] == ["It ships today."]
    earlier = Segment(0, "Sure.", tone(0.2), 24_000)
    assert [s.text for s in mem.reply_context(reply=[earlier])] == ["Where is my order?", "Sure."]
    assert [s.text for s in mem.reply_context(max_turns=1)] == ["It ships today."]
    assert mem.reply_context(max_turns=0) == ()

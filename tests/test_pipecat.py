"""MisoTTSService in real Pipecat 1.14 pipelines (pipecat.tests.utils.run_test) on the tiny checkpoint.

The tests where the engine path matters run twice (``mode``): with the engine in process, and with
``url=`` against a loopback ``misotts-agents serve`` of the same engine (so spies on ``miso.stream``
see the request as it reached the server)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from engines import load_tiny
from fakes import AdmittedAtOnce
from pipecat.frames.frames import (
    AggregatedTextProgressFrame,
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    LLMContextUserTurnFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    OutputAudioRawFrame,
    StartFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
    TTSUpdateSettingsFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams
from pipecat.utils.errors import ErrorCategory
from remote_server import free_port, mode_fixture, server_fixture
from signals import tone, wait_until

from misotts_agents.audio import FRAME_SAMPLES
from misotts_agents.engine.miso_engine import MisoEngine
from misotts_agents.engine.registry import shared_engine
from misotts_agents.engine.request import AudioChunk, StreamStats
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.engine.words import WordAligner, WordTiming
from misotts_agents.errors import EngineBusy
from misotts_agents.pipecat import MisoTTSService
from misotts_agents.server import RemoteConnectionError, RemoteEngine, RemoteError

SHORT = MisoTTSService.Settings(max_audio_ms=480, seed=1)  # 6 frames per sentence


@pytest.fixture(scope="module")
def miso(tiny_dir):
    with load_tiny(tiny_dir, max_batch=2) as engine:
        yield engine


miso_server = server_fixture("miso")  # one loopback server of ``miso`` for the file, started on first use
mode = mode_fixture("miso", "miso_server")  # "local": engine=miso; "remote": url= of miso_server


class Spy:
    """Wraps ``engine.stream`` to record every request and the stream it got (in remote mode: the
    request the server parsed from the wire, and the server's stream)."""

    def __init__(self, engine: MisoEngine, monkeypatch: pytest.MonkeyPatch, fake=None) -> None:
        self.calls: list[tuple] = []
        real = engine.stream

        def stream(request, **options):  # (the server passes its client's identity)
            s = fake(request) if fake is not None else real(request, **options)
            self.calls.append((request, s))
            return s

        monkeypatch.setattr(engine, "stream", stream)

    @property
    def requests(self):
        return [r for r, _ in self.calls]


def run(service, frames, rate: int = 24_000):
    return asyncio.run(
        run_test(service, frames_to_send=frames, pipeline_params=PipelineParams(audio_out_sample_rate=rate))
    )


WORD_FRAMES = (TTSTextFrame, AggregatedTextProgressFrame)  # one pair per word, as the word plays


def names(frames: list[Frame]) -> list[str]:
    """Frame types in order, runs of audio collapsed, word frames left out (see spoken_words)."""
    out: list[str] = []
    for f in frames:
        name = type(f).__name__
        if isinstance(f, WORD_FRAMES) or (name == "TTSAudioRawFrame" and out and out[-1] == name):
            continue
        out.append(name)
    return out


def said(text: str, stats: StreamStats) -> str:
    """The words of ``text`` the engine says were spoken: all of them when the sentence ended by itself,
    else those that started within the audio before the length limit cut it (engine/words.py)."""
    if stats.stop_reason == "eos":
        return text
    return " ".join(w.word for w in WordAligner(text).advance(stats.frames * 0.08))


def spoken_words(frames: list[Frame]) -> list[str]:
    """The words pushed as TTSTextFrames (word timestamps), checked to come in time order."""
    words = [f for f in frames if isinstance(f, TTSTextFrame)]
    assert [f.pts for f in words] == sorted(f.pts for f in words)
    assert all(f.pts for f in words)
    return [f.text for f in words]


def user_turn(text_frame: Frame, seconds: float = 0.6, rate: int = 16_000) -> list[Frame]:
    pcm = (tone(seconds, rate) * 32767).astype(np.int16)
    step = rate // 50  # 20 ms frames, like a transport
    audio = [InputAudioRawFrame(pcm[i : i + step].tobytes(), rate, 1) for i in range(0, pcm.size, step)]
    return [UserStartedSpeakingFrame(), *audio, UserStoppedSpeakingFrame(), text_frame]


# What one TTSSpeakFrame produces downstream, in order (audio collapsed, word frames aside).
SPEAK_FRAMES = [
    "AggregatedTextFrame",
    "TTSStartedFrame",
    "TTSAudioRawFrame",
    "LLMAssistantPushAggregationFrame",
    "TTSStoppedFrame",
]


def same_voice(got: VoicePrompt | None, voice: VoicePrompt) -> bool:
    """The voice prompt itself (in process), or the same one after the trip as int16 (remote)."""
    if got is voice:
        return True
    return (
        got is not None
        and (got.speaker, got.text) == (voice.speaker, voice.text)
        and np.allclose(got.audio, voice.audio, atol=2 / 32767)
    )


def test_speak_frame_order_and_pcm(mode, monkeypatch):
    spy = Spy(mode.engine, monkeypatch)
    tts = MisoTTSService(**mode.kwargs, settings=SHORT)
    down, up = run(tts, [TTSSpeakFrame("Hello there.")])
    assert names(down) == SPEAK_FRAMES
    assert " ".join(spoken_words(down)) == "Hello there."  # timed words (a word cut by max_audio_ms: at the end)
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert len(audio) > 1  # streamed in chunks, not one blob
    ctx = down[1].context_id
    assert all(f.context_id == ctx and f.num_channels == 1 and f.sample_rate == 24_000 for f in audio)
    (request, stream), *_ = spy.calls
    assert request.text == "Hello there."
    assert stream.stats.stop_reason in ("max_frames", "eos")
    assert sum(len(f.audio) for f in audio) == 2 * stream.stats.frames * FRAME_SAMPLES  # int16, 80 ms a frame


def test_llm_reply_one_context_and_sentences_condition_each_other(mode, monkeypatch):
    spy = Spy(mode.engine, monkeypatch)
    tts = MisoTTSService(**mode.kwargs, settings=SHORT)
    frames = [
        LLMFullResponseStartFrame(),
        LLMTextFrame("Hello there. "),
        LLMTextFrame("How are you today?"),
        LLMFullResponseEndFrame(),
    ]
    down, _ = run(tts, frames)
    assert names(down) == [
        "LLMFullResponseStartFrame",
        "AggregatedTextFrame",
        "TTSStartedFrame",
        "TTSAudioRawFrame",
        "AggregatedTextFrame",
        "TTSAudioRawFrame",
        "TTSStoppedFrame",
        "LLMFullResponseEndFrame",
    ]
    # every word, in time order (the words a length limit cut come at the end of the reply, from Pipecat)
    assert " ".join(spoken_words(down)) == "Hello there. How are you today?"
    assert len({f.context_id for f in down if isinstance(f, TTSAudioRawFrame)}) == 1
    first, second = spy.requests
    assert first.context == ()
    (seg,) = second.context  # the reply so far: its first sentence, as generated
    assert (seg.speaker, seg.text) == (0, said("Hello there.", spy.calls[0][1].stats))  # the words in its audio
    assert seg.audio.size == spy.calls[0][1].stats.frames * FRAME_SAMPLES


def test_a_sentences_stream_learns_where_its_audio_plays(miso, monkeypatch):
    """In process, each sentence's engine stream is told its listener's playout: after the reply's
    earlier sentences, so the scheduler sees the audio in hand (its deadlines), not real time from
    the sentence's first chunk."""
    spy = Spy(miso, monkeypatch)
    tts = MisoTTSService(engine=miso, settings=SHORT)
    frames = [LLMFullResponseStartFrame(), LLMTextFrame("Hello there. How are you today?"), LLMFullResponseEndFrame()]
    run(tts, frames)
    (_, first), (_, second) = spy.calls
    assert first.playout is not None
    assert second.playout is not None
    # everything was handed over at once, faster than real time: the second sentence's audio, queued
    # behind the first's, has not started playing, whatever the wall time since its first chunk
    assert first.playout() <= first.stats.audio_s
    assert second.playout() == 0.0 or first.playout() >= first.stats.audio_s - 1e-6


@pytest.mark.parametrize("rate", [8_000, 16_000, 24_000, 48_000])
def test_output_rate_labels_and_lengths(miso, monkeypatch, rate):
    spy = Spy(miso, monkeypatch)
    tts = MisoTTSService(engine=miso, settings=SHORT)
    down, _ = run(tts, [TTSSpeakFrame("Hello there.")], rate=rate)
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert audio
    assert {(f.sample_rate, f.num_channels) for f in audio} == {(rate, 1)}
    samples = sum(len(f.audio) for f in audio) // 2
    expected = spy.calls[0][1].stats.frames * FRAME_SAMPLES * rate / 24_000
    assert abs(samples - expected) <= rate * 0.002  # streaming resampler, flushed at the end: within 2 ms


def test_interruption_cancels_the_engine_request_and_frees_its_slot(mode, monkeypatch):
    miso = mode.engine
    spy = Spy(miso, monkeypatch)
    before = miso.metrics().cancelled
    long = MisoTTSService.Settings(max_audio_ms=8_000, seed=1)  # 100 frames: far longer than the test
    tts = MisoTTSService(**mode.kwargs, settings=long)
    frames = [
        TTSSpeakFrame("This reply is going to be interrupted."),
        SleepFrame(0.8),
        InterruptionFrame(),
        SleepFrame(0.4),
        TTSUpdateSettingsFrame(delta=MisoTTSService.Settings(max_audio_ms=240)),
        TTSSpeakFrame("Okay."),
    ]
    down, up = run(tts, frames)
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    (_, cut), (_, after) = spy.calls
    assert cut.stats.stop_reason == "cancelled"
    assert 0 < cut.stats.frames < 100
    assert after.stats.stop_reason in ("max_frames", "eos")
    # (a stream learns its end just before the scheduler thread puts its slot back)
    assert wait_until(lambda: miso.free_slots == miso.max_batch and miso.metrics().active == 0, timeout=2.0)
    assert miso.metrics().cancelled == before + 1
    # no audio of the interrupted reply after the interruption; the next reply plays normally
    i = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    first_ctx = next(f.context_id for f in down if isinstance(f, TTSStartedFrame))
    assert not [f for f in down[i:] if isinstance(f, TTSAudioRawFrame) and f.context_id == first_ctx]
    assert [f for f in down[i:] if isinstance(f, TTSAudioRawFrame)]
    assert isinstance(down[-1], TTSStoppedFrame)


def test_interruption_frees_the_slot_within_a_frame_step(mode):
    """The cancel reaches the scheduler (remote: the server's) while the pipeline is still running,
    not at its end."""
    miso = mode.engine

    class Probe(FrameProcessor):
        slots: list[int] = []  # noqa: RUF012
        waited: list[float] = []  # noqa: RUF012

        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, InterruptionFrame):  # the TTS has handled it: poll the engine
                start = time.monotonic()
                while miso.free_slots < miso.max_batch and time.monotonic() - start < 2.0:
                    await asyncio.sleep(0.01)
                self.slots.append(miso.free_slots)
                self.waited.append(time.monotonic() - start)
            await self.push_frame(frame, direction)

    tts = MisoTTSService(**mode.kwargs, settings=MisoTTSService.Settings(max_audio_ms=8_000, seed=2))
    frames = [TTSSpeakFrame("Interrupt me, please."), SleepFrame(0.6), InterruptionFrame(), SleepFrame(0.5)]
    run(Pipeline([tts, Probe()]), frames)
    assert Probe.slots == [miso.max_batch]
    assert Probe.waited[0] < 1.0  # one frame step of the tiny model is ~0.1 s on 2 CPU cores


class FakeStream(AdmittedAtOnce):
    """A stream that hands over ``seconds`` of audio at once (faster than real time), then waits."""

    def __init__(self, seconds: float, fail: Exception | None = None, hold: bool = False, delay: float = 0.0) -> None:
        self.chunks = [AudioChunk(tone(seconds), 0, int(seconds * 12.5), False)]
        self.delay = delay
        self.fail = fail
        self.hold = hold
        self.cancelled = False
        self.stats = StreamStats()  # what the server reports at the end (remote mode)
        self.codes = np.zeros((0, 32), dtype=np.int64)

    def cancel(self):
        self.cancelled = True

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.delay:  # queued behind other conversations, or a long prefill
            await asyncio.sleep(self.delay)
            self.delay = 0.0
        if self.chunks:
            return self.chunks.pop(0)
        if self.fail is not None:
            raise self.fail
        if self.hold:
            await asyncio.sleep(30)  # generation goes on until cancelled
        raise StopAsyncIteration


class PacedStream(AdmittedAtOnce):
    """What the engine streams for a sentence, at a chosen pace: a chunk of ``CHUNK_S`` every
    ``every_s`` seconds (0: all at once, generation far ahead of playback; more than ``CHUNK_S``:
    slower than real time, so playback stalls), each with the words whose start falls in it (one word
    every ``WORD_S``), until ``seconds`` of audio, then end of speech (or hold until cancelled)."""

    CHUNK_S, WORD_S = 0.16, 0.4

    def __init__(self, text: str, seconds: float, every_s: float = 0.0, hold: bool = True) -> None:
        self.words = text.split()
        self.frames = round(self.CHUNK_S * 12.5)
        self.count = round(seconds / self.CHUNK_S)
        self.every_s, self.hold = every_s, hold
        self.sent = 0
        self.cancelled = False
        self.stats = StreamStats()
        self.codes = np.zeros((0, 32), dtype=np.int64)

    def word_start(self, i: int) -> float:
        return i * self.WORD_S

    def cancel(self):
        self.cancelled = True

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.sent >= self.count:
            if self.hold:
                await asyncio.sleep(30)  # still generating when the user barges in
            raise StopAsyncIteration
        if self.every_s:
            await asyncio.sleep(self.every_s)
        k, self.sent = self.sent, self.sent + 1
        start, end = k * self.CHUNK_S, (k + 1) * self.CHUNK_S
        last = self.sent == self.count and not self.hold
        words = tuple(
            WordTiming(w, self.word_start(i), self.word_start(i + 1))
            for i, w in enumerate(self.words)
            if start <= self.word_start(i) < end or (last and self.word_start(i) >= end)
        )
        return AudioChunk(tone(self.CHUNK_S), k * self.frames, self.frames, last, words=words)


class Speaker(BaseOutputTransport):
    """An output transport that plays audio at real time (sleeping for it, as a sound card blocks) and
    releases word frames at their presentation time, as Pipecat's transports do; ``barge_at``: once
    that much audio has played, the user barges in (``barge`` broadcasts an interruption)."""

    def __init__(self, barge: FrameProcessor, barge_at: float) -> None:
        super().__init__(TransportParams(audio_out_enabled=True, audio_out_sample_rate=24_000))
        self.barge, self.barge_at = barge, barge_at
        self.played = 0.0

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        await asyncio.sleep(len(frame.audio) / 2 / frame.sample_rate)
        self.played += len(frame.audio) / 2 / frame.sample_rate
        if self.barge_at is not None and self.played >= self.barge_at:
            self.barge_at = None
            self.barge.create_task(self.barge.broadcast_interruption())
        return True


class Barge(FrameProcessor):
    """Stands where the user aggregator is: it broadcasts the interruption when the speaker says so."""

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


def reply(text: str) -> list[Frame]:
    return [LLMFullResponseStartFrame(), LLMTextFrame(text), LLMFullResponseEndFrame()]


@pytest.mark.parametrize("pace", ["ahead", "behind"])
def test_interrupted_reply_keeps_exactly_the_words_heard(mode, monkeypatch, pace):
    """Generation far ahead of playback (a GPU), or slower than it (a loaded GPU, a CPU: playback
    stalls): either way Pipecat's assistant context and the turn memory keep the same words, those
    whose audio had started playing when the user barged in, and the memory's audio is what played."""
    said = "one two three four five six seven eight nine ten."
    every = 0.0 if pace == "ahead" else 1.5 * PacedStream.CHUNK_S
    Spy(mode.engine, monkeypatch, fake=lambda r: PacedStream(r.text, 3.2, every_s=every))
    tts = MisoTTSService(**mode.kwargs)
    context = LLMContext()
    barge = Barge()
    speaker = Speaker(barge, barge_at=1.0)  # words start at 0, 0.4, 0.8, 1.2...: three were heard
    frames = [*reply(said), SleepFrame(4.0)]
    run(Pipeline([barge, tts, speaker, LLMContextAggregatorPair(context).assistant()]), frames)
    assert [m["content"] for m in context.get_messages()] == ["one two three"]
    (turn,) = tts.memory.context()
    assert (turn.speaker, turn.text) == (0, "one two three")
    assert 0.95 <= turn.audio.size / 24_000 <= 1.15  # what had played (not all 3.2 s generated, nor wall time)


@pytest.mark.parametrize("mode", ["local"], indirect=True)
def test_interrupted_real_reply_text_and_audio_agree(mode):
    """The tiny engine, as it really streams: the assistant context and the memory end on the same word."""
    tts = MisoTTSService(**mode.kwargs, settings=MisoTTSService.Settings(max_audio_ms=8_000, seed=3))
    context = LLMContext()
    barge = Barge()
    speaker = Speaker(barge, barge_at=0.7)
    said = "Sure thing, I can help with that order of yours right away."
    run(Pipeline([barge, tts, speaker, LLMContextAggregatorPair(context).assistant()]), [*reply(said), SleepFrame(3.0)])
    (turn,) = tts.memory.context()
    heard = [m["content"] for m in context.get_messages()]
    assert heard == [turn.text]
    assert said.startswith(turn.text)
    assert turn.text != said
    assert 0.65 <= turn.audio.size / 24_000 <= 0.9


def test_only_an_interruption_cuts_the_reply(miso, monkeypatch):
    """Interruptions off: the user talks while the reply plays (no InterruptionFrame comes). The reply
    is remembered whole, as one turn, and the user's turn after it."""
    Spy(miso, monkeypatch, fake=lambda r: PacedStream(r.text, 1.6, hold=False))
    tts = MisoTTSService(engine=miso)
    talk = user_turn(LLMContextUserTurnFrame(text="Wait a second.", timestamp=""), 0.4)
    frames = [*reply("First sentence here. And a second one."), SleepFrame(0.3), *talk, SleepFrame(0.5)]
    frames += reply("Okay, waiting.")
    run(tts, frames)
    agent, user = tts.memory.context()  # (the last reply is still open)
    assert (agent.speaker, agent.text) == (0, "First sentence here. And a second one.")
    assert agent.audio.size == 2 * round(1.6 * 12.5) * FRAME_SAMPLES  # both sentences, all of their audio
    assert (user.speaker, user.text) == (1, "Wait a second.")


def test_agent_turn_is_cut_to_what_was_played(miso, monkeypatch):
    spy = Spy(miso, monkeypatch, fake=lambda r: FakeStream(2.0, hold=True) if len(spy.calls) == 0 else FakeStream(0.1))
    tts = MisoTTSService(engine=miso)
    said = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen."
    start = time.monotonic()
    frames = [TTSSpeakFrame(said), SleepFrame(0.4), InterruptionFrame(), SleepFrame(0.1), TTSSpeakFrame("Sorry?")]
    _down, _ = run(tts, frames)
    elapsed = time.monotonic() - start
    first, _ = spy.calls
    assert first[1].cancelled
    (seg,) = spy.requests[1].context
    played = seg.audio.size / 24_000
    assert 0.25 <= played <= min(elapsed, 1.9)  # ~0.4 s of the 2 s generated had played
    assert seg.speaker == 0
    assert said.startswith(seg.text)
    assert 0 < len(seg.text.split()) < 16


@pytest.mark.parametrize(
    ("via", "mode"),
    [("user_turn_frame", "local"), ("transcription", "local"), ("user_turn_frame", "remote")],
    indirect=["mode"],
)
def test_user_audio_and_transcript_reach_the_prompt(mode, monkeypatch, via):
    spy = Spy(mode.engine, monkeypatch)
    tts = MisoTTSService(**mode.kwargs, settings=SHORT)
    text = (
        LLMContextUserTurnFrame(text="Where is my order?", timestamp="")
        if via == "user_turn_frame"
        else TranscriptionFrame("Where is my order?", "user", "")
    )
    run(tts, [*user_turn(text), TTSSpeakFrame("It is on its way."), TTSSpeakFrame("It comes today.")])
    first, second = spy.requests
    (user,) = first.context
    assert (user.speaker, user.text, user.sample_rate) == (1, "Where is my order?", 24_000)
    # the 16 kHz turn, resampled to 24 kHz as one stream and flushed at the turn's end: all 0.6 s
    assert abs(user.audio.size - 0.6 * 24_000) <= 24
    assert np.abs(user.audio).max() > 0.2  # the user's real audio (remote: as it reached the server)
    # the next utterance hears the user's turn and then the agent's first reply
    heard = said("It is on its way.", spy.calls[0][1].stats)  # cut at max_audio_ms: the words in its audio
    assert [(s.speaker, s.text) for s in second.context] == [(1, "Where is my order?"), (0, heard)]


def test_user_audio_tap_when_audio_does_not_reach_the_tts(miso, monkeypatch):
    class DropInputAudio(FrameProcessor):  # e.g. an STT with audio_passthrough=False
        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if not isinstance(frame, InputAudioRawFrame):
                await self.push_frame(frame, direction)

    spy = Spy(miso, monkeypatch)
    tts = MisoTTSService(engine=miso, settings=SHORT)
    text = LLMContextUserTurnFrame(text="Can you hear me?", timestamp="")
    run(Pipeline([tts.user_audio_tap(), DropInputAudio(), tts]), [*user_turn(text, 0.4), TTSSpeakFrame("Yes.")])
    (user,) = spy.requests[0].context
    assert user.text == "Can you hear me?"
    assert abs(user.audio.size / 24_000 - 0.4) < 0.04


def test_tap_and_service_do_not_record_the_audio_twice(miso, monkeypatch):
    spy = Spy(miso, monkeypatch)
    tts = MisoTTSService(engine=miso, settings=SHORT)
    text = TranscriptionFrame("Twice?", "user", "")
    run(Pipeline([tts.user_audio_tap(), tts]), [*user_turn(text, 0.4), TTSSpeakFrame("Once.")])
    (user,) = spy.requests[0].context
    assert user.text == "Twice?"
    assert abs(user.audio.size / 24_000 - 0.4) < 0.04


def test_tone_conditioning_off_and_max_turns(miso, monkeypatch):
    spy = Spy(miso, monkeypatch)
    off = MisoTTSService(engine=miso, settings=SHORT, tone_conditioning=False)
    text = LLMContextUserTurnFrame(text="Hi.", timestamp="")
    run(off, [*user_turn(text, 0.2), TTSSpeakFrame("Hello."), TTSSpeakFrame("Again.")])
    assert [r.context for r in spy.requests] == [(), ()]
    one = MisoTTSService(engine=miso, settings=SHORT, max_turns=1)
    run(one, [*user_turn(text, 0.2), TTSSpeakFrame("Hello."), TTSSpeakFrame("Again.")])
    assert [[s.text for s in r.context] for r in spy.requests[2:]] == [["Hi."], ["Hello."]]


def test_engine_rejections_and_failures_become_error_frames(mode, monkeypatch):
    # a request the engine rejects: a watermark asked of an engine loaded without one
    # (a context without audio ends after stop_frame_timeout_s, as in any Pipecat TTS: keep it short)
    # remote: the server's error messages come back as the same exception classes
    miso = mode.engine
    quick = {**mode.kwargs, "stop_frame_timeout_s": 0.5}
    tts = MisoTTSService(**quick, settings=MisoTTSService.Settings(max_audio_ms=240, watermark=True))
    fix = TTSUpdateSettingsFrame(delta=MisoTTSService.Settings(watermark=None))
    down, up = run(tts, [TTSSpeakFrame("Mark this."), fix, TTSSpeakFrame("Now without.")])
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert errors
    assert "watermark" in errors[0].error
    assert [f for f in down if isinstance(f, TTSAudioRawFrame)]  # the pipeline kept going

    # bad settings (invalid request), a busy engine and a failure mid-stream
    with pytest.raises(ValueError, match="temperature"):  # bad settings: refused at once
        MisoTTSService(**quick, settings=MisoTTSService.Settings(temperature=-1.0))

    def busy(request):
        raise EngineBusy("engine busy: test")

    Spy(miso, monkeypatch, fake=busy)
    _, up = run(MisoTTSService(**quick), [TTSSpeakFrame("Anyone?")])
    assert any("engine busy" in f.error for f in up if isinstance(f, ErrorFrame))

    Spy(miso, monkeypatch, fake=lambda r: FakeStream(0.2, fail=RuntimeError("step failed")))
    down, up = run(MisoTTSService(**quick), [TTSSpeakFrame("Half.")])
    assert any("step failed" in f.error for f in up if isinstance(f, ErrorFrame))
    assert [f for f in down if isinstance(f, TTSAudioRawFrame)]  # the audio before the failure was kept


def test_settings_update_applies_to_the_next_request(mode, monkeypatch):
    spy = Spy(mode.engine, monkeypatch)
    voice = VoicePrompt(0, "This is my voice.", tone(1.0), 24_000)
    tts = MisoTTSService(**mode.kwargs, settings=SHORT)
    tts.register_voice("alto", voice)
    delta = MisoTTSService.Settings(temperature=0.5, topk=3, max_audio_ms=240, seed=7, voice="alto", watermark=False)
    run(tts, [TTSSpeakFrame("Before."), TTSUpdateSettingsFrame(delta=delta), TTSSpeakFrame("After.")])
    before, after = spy.requests
    assert (before.temperature, before.topk, before.max_frames, before.seed, before.voice) == (0.9, 50, 6, 1, None)
    assert (after.temperature, after.topk, after.max_frames, after.seed) == (0.5, 3, 3, 7)
    assert same_voice(after.voice, voice)
    assert after.watermark is False
    assert spy.calls[1][1].stats.frames <= 3


def test_bad_settings_update_is_refused_and_the_old_value_kept(mode, monkeypatch):
    spy = Spy(mode.engine, monkeypatch)
    tts = MisoTTSService(**mode.kwargs, settings=SHORT)
    bad = [
        MisoTTSService.Settings(topk=0),
        MisoTTSService.Settings(temperature=float("nan")),
        MisoTTSService.Settings(max_audio_ms=10),
        MisoTTSService.Settings(max_ahead_s=-1.0),
        MisoTTSService.Settings(seed=-5),
        MisoTTSService.Settings(voice="nobody"),
        MisoTTSService.Settings(topk=3, temperature=0.0),  # one bad value refuses the whole update
    ]
    frames = [TTSSpeakFrame("Before."), *[TTSUpdateSettingsFrame(delta=d) for d in bad], TTSSpeakFrame("After.")]
    down, up = run(tts, frames)
    errors = [f.error for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == len(bad)
    assert all("settings update refused" in e for e in errors)
    for word, error in zip(
        ["topk", "temperature", "max_audio_ms", "max_ahead_s", "seed", "nobody", "temperature"], errors, strict=True
    ):
        assert word in error
    _, after = spy.requests  # both sentences spoken, the second with the settings unchanged
    assert (after.topk, after.temperature, after.max_frames, after.max_ahead_s, after.seed, after.voice) == (
        50,
        0.9,
        6,
        None,
        1,
        None,
    )
    assert len({f.context_id for f in down if isinstance(f, TTSAudioRawFrame)}) == 2


def test_token_aggregation_is_refused_with_a_reason(miso):
    from pipecat.services.tts_service import TextAggregationMode

    with pytest.raises(ValueError, match="whole sentences"):
        MisoTTSService(engine=miso, text_aggregation_mode=TextAggregationMode.TOKEN)
    MisoTTSService(engine=miso, text_aggregation_mode=TextAggregationMode.SENTENCE)  # the default is fine


def test_metrics_carry_the_engines_model(mode, tiny_dir):
    from pipecat.frames.frames import MetricsFrame

    tts = MisoTTSService(**mode.kwargs, settings=SHORT)
    expected = str(tiny_dir) if mode.name == "local" else mode.kwargs["url"]  # (remote: the server it speaks to)
    assert tts.settings.model == expected
    params = PipelineParams(enable_metrics=True, enable_usage_metrics=True)
    down, _ = asyncio.run(run_test(tts, frames_to_send=[TTSSpeakFrame("Hi.")], pipeline_params=params))
    models = {d.model for f in down if isinstance(f, MetricsFrame) for d in f.data}
    assert models - {None} == {expected}  # (None: figures Pipecat keeps without a model)
    assert MisoTTSService(**mode.kwargs, model="my-label").settings.model == "my-label"


def test_constructor_voice_is_the_default(miso, monkeypatch):
    spy = Spy(miso, monkeypatch)
    voice = VoicePrompt(0, "This is my voice.", tone(1.0), 24_000)
    tts = MisoTTSService(engine=miso, voice=voice, settings=SHORT)
    run(tts, [TTSSpeakFrame("Hello."), TTSUpdateSettingsFrame(delta=MisoTTSService.Settings(voice="nobody"))])
    assert spy.requests[0].voice is voice


def test_services_share_one_engine(tiny_dir):
    a = MisoTTSService(str(tiny_dir), device="cpu", watermark=False)
    b = MisoTTSService(str(tiny_dir), device="cpu", watermark=False)
    try:
        assert a.engine is b.engine
        assert a.memory is not b.memory
        assert a.engine is shared_engine(str(tiny_dir), device="cpu", watermark=False)
    finally:
        a.engine.close()


def test_real_user_aggregator_and_llm_stand_in(miso, monkeypatch):
    """Pipecat's own user aggregator decides the turn; the TTS, after a stand-in LLM, gets the user's
    audio (InputAudioRawFrame passed down by the aggregator and the LLM) and the turn's text
    (LLMContextUserTurnFrame, which the aggregator broadcasts before it runs the LLM)."""
    from pipecat.frames.frames import LLMContextFrame, VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import (
        LLMContextAggregatorPair,
        LLMUserAggregatorParams,
    )
    from pipecat.turns.user_stop.speech_timeout_user_turn_stop_strategy import SpeechTimeoutUserTurnStopStrategy
    from pipecat.turns.user_turn_strategies import UserTurnStrategies

    class StandInLLM(FrameProcessor):  # forwards what it doesn't handle, like pipecat's LLM services
        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, LLMContextFrame):
                await self.push_frame(LLMFullResponseStartFrame())
                await self.push_frame(LLMTextFrame("It is on its way."))
                await self.push_frame(LLMFullResponseEndFrame())
            else:
                await self.push_frame(frame, direction)

    spy = Spy(miso, monkeypatch)
    strategies = UserTurnStrategies(stop=[SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=0.1)])
    user, _ = LLMContextAggregatorPair(
        LLMContext(), user_params=LLMUserAggregatorParams(user_turn_strategies=strategies)
    )
    tts = MisoTTSService(engine=miso, settings=SHORT)
    turn = user_turn(TranscriptionFrame("Where is my order?", "user", ""), 0.6)
    frames = [VADUserStartedSpeakingFrame(), *turn[1:-2], turn[-1], VADUserStoppedSpeakingFrame(), SleepFrame(1.0)]
    down, _ = run(Pipeline([user, StandInLLM(), tts]), frames)
    assert [f for f in down if isinstance(f, TTSAudioRawFrame)]
    (request,) = spy.requests
    (seg,) = request.context
    assert (seg.speaker, seg.text) == (1, "Where is my order?")
    assert 0.3 <= seg.audio.size / 24_000 <= 0.7  # from the aggregator's turn start (plus pre-roll)


def test_ttfb_and_usage_metrics(mode):
    from pipecat.frames.frames import MetricsFrame
    from pipecat.metrics.metrics import TTFBMetricsData, TTSUsageMetricsData

    tts = MisoTTSService(**mode.kwargs, settings=SHORT)  # remote: RemoteEngine.metrics() is None, unused
    params = PipelineParams(enable_metrics=True, enable_usage_metrics=True)
    down, _ = asyncio.run(run_test(tts, frames_to_send=[TTSSpeakFrame("Hello there.")], pipeline_params=params))
    data = [d for f in down if isinstance(f, MetricsFrame) for d in f.data]
    ttfb = [d for d in data if isinstance(d, TTFBMetricsData) and d.value > 0]
    usage = [d for d in data if isinstance(d, TTSUsageMetricsData)]
    assert ttfb
    assert usage
    assert usage[0].value == len("Hello there.")


def test_slow_first_audio_keeps_the_audio_context_open(miso, monkeypatch):
    """Pipecat ends a context that gets nothing for stop_frame_timeout_s (3 s by default); a request
    waiting in a busy engine must not be written off as "completed with no audio"."""
    Spy(miso, monkeypatch, fake=lambda r: FakeStream(0.2, delay=1.2))
    tts = MisoTTSService(engine=miso, stop_frame_timeout_s=0.4)
    down, up = run(tts, [TTSSpeakFrame("Wait for it.")])
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    assert names(down) == SPEAK_FRAMES


# -- remote mode only --------------------------------------------------------------------------------


def test_remote_mode_loads_nothing_and_closes_its_connection(miso, miso_server, monkeypatch):
    import misotts_agents.pipecat.tts as service_module

    def no_load(*args, **kwargs):
        raise AssertionError("url= must not load an engine")

    monkeypatch.setattr(service_module, "shared_engine", no_load)
    monkeypatch.setenv("MISOTTS_TOKEN", miso_server.token)
    tts = MisoTTSService(url=miso_server.url, settings=SHORT)  # the token from the environment
    assert isinstance(tts.engine, RemoteEngine)
    assert tts.engine.token == miso_server.token
    down, up = run(tts, [TTSSpeakFrame("Hello there.")])
    assert names(down) == SPEAK_FRAMES
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    assert tts.engine.closed  # cleanup() closed the service's own connection
    with pytest.raises(ValueError, match="not both"):
        MisoTTSService(engine=miso, url=miso_server.url)
    assert wait_until(lambda: miso.free_slots == miso.max_batch, timeout=2.0)


def test_remote_connection_failures_are_retryable_error_frames(miso_server):
    quick = {"settings": SHORT, "stop_frame_timeout_s": 0.5}
    nobody = MisoTTSService(url=f"ws://127.0.0.1:{free_port()}", **quick)  # nothing listens there
    _, up = run(nobody, [TTSSpeakFrame("Anyone there?"), TTSSpeakFrame("Still nobody?")])
    # (Pipecat adds its own "completed with no audio" errors)
    errors = [f for f in up if isinstance(f, ErrorFrame) and isinstance(f.exception, RemoteConnectionError)]
    assert len(errors) == 2  # not permanent: the service kept taking sentences (each one reconnects)
    for f in errors:
        assert "connection failed" in f.error
        assert f.category is ErrorCategory.CONNECTIVITY
        assert not f.category.is_permanent
    # a wrong token: the server refuses the connection
    _, up = run(MisoTTSService(url=miso_server.url, token="wrong", **quick), [TTSSpeakFrame("Let me in.")])
    refused = [f for f in up if isinstance(f, ErrorFrame) and isinstance(f.exception, RemoteError)]
    assert refused
    assert all(f.category is ErrorCategory.AUTHENTICATION for f in refused)
    assert not any(isinstance(f.exception, RemoteConnectionError) for f in up if isinstance(f, ErrorFrame))

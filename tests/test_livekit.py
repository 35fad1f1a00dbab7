"""LiveKit integration: streaming TTS on a tiny checkpoint, an AgentSession without a server (fake
STT/LLM, captured audio), interruption, tone context, errors, and the inference-process path.

The tests where the engine path matters run twice (``mode``): with the engine in process, and with
``url=`` against a loopback ``misotts-agents serve`` of the same engine (spies on ``lk_engine.stream``
then see the request as it reached the server)."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from engines import load_tiny
from fakes import AdmittedAtOnce
from livekit import rtc
from livekit.agents import (
    APIConnectionError,
    APIConnectOptions,
    APIError,
    APIStatusError,
    APITimeoutError,
    llm,
    stt,
    utils,
)
from livekit.agents.testing import fake_job_context
from livekit.agents.types import USERDATA_TIMED_TRANSCRIPT, TimedString
from livekit.agents.voice import Agent, AgentSession, io
from remote_server import free_port, mode_fixture, server_fixture
from signals import tone

from misotts_agents.audio import FRAME_SAMPLES, to_mono
from misotts_agents.engine.miso_engine import MisoEngine
from misotts_agents.engine.request import AudioChunk, Segment, StreamStats, SynthesisRequest
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.engine.words import WordAligner, estimated_duration_s, split_for_length
from misotts_agents.errors import EngineBusy, EngineClosed, InvalidRequest, ModelSourceError, from_wire
from misotts_agents.livekit import TTS, InferenceEngine, MisoInferenceRunner, MisoToneMixin, map_error, tone_for
from misotts_agents.livekit.speaker import SPLIT_SHARE
from misotts_agents.server import RemoteConnectionError, RemoteEngine, RemoteError

RATE = 24_000
MAX_MS = 480  # at most 6 frames per sentence keeps the file fast
FAST = APIConnectOptions(max_retry=1, retry_interval=0.01, timeout=20.0)


@pytest.fixture(scope="module")
def lk_engine(tiny_dir: Path):
    with load_tiny(tiny_dir, max_batch=2) as engine:
        yield engine


lk_server = server_fixture("lk_engine")  # one loopback server of ``lk_engine`` for the file, started on first use
mode = mode_fixture("lk_engine", "lk_server")  # "local": engine=lk_engine; "remote": url= of lk_server


class Recorder:
    """Wraps ``engine.stream`` (in place) to keep every SynthesisRequest the engine receives: in remote
    mode, the request as the server parsed it from the wire."""

    def __init__(self, engine: MisoEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.requests = []
        real = engine.stream

        def stream(request, **options):  # (the server passes its client's identity)
            self.requests.append(request)
            return real(request, **options)

        monkeypatch.setattr(engine, "stream", stream)


async def wait_for(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.01)


def check_events(events, *, streamed: bool) -> None:
    """The rules LiveKit's own TTS tests check on emitted audio."""
    assert events
    assert len({e.request_id for e in events}) == 1
    assert events[0].request_id
    assert [e.is_final for e in events].count(True) == 1
    assert events[-1].is_final
    assert events[-1].frame.duration < 0.25
    for e in events:
        assert e.frame.sample_rate == RATE
        assert e.frame.num_channels == 1
    if streamed:
        assert all(e.segment_id for e in events)
        assert len({e.segment_id for e in events}) == 1


def timed_words(events) -> list[TimedString]:
    """The TimedStrings the TTS pushed (LiveKit hands them on in the frames' userdata)."""
    return [w for e in events for w in e.frame.userdata.get(USERDATA_TIMED_TRANSCRIPT, [])]


def samples(events) -> int:
    return sum(e.frame.samples_per_channel for e in events)


# -- the TTS alone ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_stream_pushes_frames_as_generated(mode):
    lk_engine = mode.engine
    tts = TTS("tiny", **mode.kwargs, max_audio_ms=MAX_MS, topk=1)
    assert tts.capabilities.streaming
    assert tts.sample_rate == RATE
    assert tts.num_channels == 1
    assert tts.model == "tiny"
    assert tts.provider == "misotts"
    stream = tts.stream(conn_options=FAST)
    for word in ["Hello there, ", "this is a ", "test of streaming."]:
        stream.push_text(word)
    stream.end_input()
    events = [ev async for ev in stream]
    check_events(events, streamed=True)
    total = samples(events)
    # one request per piece of the sentence (split to fit max_audio_ms), each at most MAX_MS
    pieces = split_for_length("Hello there, this is a test of streaming.", MAX_MS / 1000 * SPLIT_SHARE)
    assert total % FRAME_SAMPLES == 0
    assert 0 < total <= len(pieces) * MAX_MS * RATE // 1000  # 80 ms per frame
    assert events[0].frame.duration <= 0.1  # first audio leaves after the first frame
    # the words, timed: in order, within the audio, as one text
    assert tts.capabilities.aligned_transcript
    words = timed_words(events)
    assert "".join(words) == "Hello there, this is a test of streaming."[: len("".join(words))]
    assert words
    starts = [w.start_time for w in words]
    assert starts == sorted(starts)
    assert starts[0] == 0.0
    assert starts[-1] < total / RATE
    assert all(w.end_time >= w.start_time for w in words)
    await wait_for(lambda: lk_engine.free_slots == lk_engine.max_batch, timeout=1.0)
    await tts.aclose()


@pytest.mark.asyncio
async def test_synthesize_one_shot(lk_engine):
    tts = TTS(engine=lk_engine, max_audio_ms=MAX_MS)
    events = [ev async for ev in tts.synthesize("One short sentence.", conn_options=FAST)]
    check_events(events, streamed=False)
    assert samples(events) % FRAME_SAMPLES == 0
    frame = await tts.synthesize("Again.", conn_options=FAST).collect()
    assert frame.sample_rate == RATE
    assert frame.samples_per_channel % FRAME_SAMPLES == 0


@pytest.mark.asyncio
async def test_cancel_mid_utterance_frees_the_slot(mode):
    lk_engine = mode.engine
    tts = TTS(**mode.kwargs, max_audio_ms=4000)
    before = lk_engine.metrics().cancelled
    stream = tts.stream(conn_options=FAST)
    stream.push_text("A long sentence that would take a while to say out loud.")
    stream.end_input()
    first = await stream.__anext__()
    assert first.frame.samples_per_channel > 0
    assert lk_engine.free_slots < lk_engine.max_batch  # still generating
    await stream.aclose()  # what LiveKit does on an interruption: the _run task is cancelled
    await wait_for(lambda: lk_engine.free_slots == lk_engine.max_batch, timeout=2.0)  # remote: a cancel message
    assert lk_engine.metrics().cancelled == before + 1
    await tts.aclose()


# -- errors and retries --------------------------------------------------------------------------


def test_error_mapping():
    cases = [
        (InvalidRequest("empty"), APIStatusError, False),
        (EngineBusy("full"), APIStatusError, True),
        (EngineClosed("closed"), APIConnectionError, False),
        (ModelSourceError("no weights"), APIConnectionError, False),
        (TimeoutError("slow"), APITimeoutError, True),
        (RuntimeError("CUDA error"), APIConnectionError, True),
        (RemoteConnectionError("cannot connect", "connection"), APIConnectionError, True),
        (RemoteError("step failed", "internal"), APIConnectionError, True),
        (RemoteError("not a message", "bad_message"), APIStatusError, False),  # as the error table says
        (from_wire("too_many", "limit"), APIStatusError, True),
    ]
    for exc, kind, retryable in cases:
        mapped = map_error(exc)
        assert isinstance(mapped, kind), exc
        assert mapped.retryable is retryable, exc


class FailingEngine(AdmittedAtOnce):
    def __init__(self, exc: Exception | None) -> None:
        self.exc = exc
        self.calls = 0
        self.stats = StreamStats()  # read by the server when the request ends (remote mode)
        self.cancelled = False

    def stream(self, request, **options):
        self.calls += 1
        if self.exc is not None:
            raise self.exc
        return self  # never yields: a hung engine

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(3600)

    def cancel(self):
        self.cancelled = True


@pytest.mark.parametrize(
    ("exc", "kind", "calls"),
    [(EngineBusy("full"), APIStatusError, 2), (InvalidRequest("bad"), APIStatusError, 1)],
)
@pytest.mark.asyncio
async def test_retry_follows_retryable(mode, monkeypatch, exc, kind, calls):
    engine = FailingEngine(exc)
    if mode.remote:  # the server's engine fails; its error message comes back as the same exception
        monkeypatch.setattr(mode.engine, "stream", engine.stream)
        tts = TTS(**mode.kwargs)
    else:
        tts = TTS(engine=engine)
    errors = []
    tts.on("error", errors.append)
    with pytest.raises(kind):
        await tts.synthesize("Hello.", conn_options=FAST).collect()
    assert engine.calls == calls  # retried once only when retryable
    assert errors[-1].recoverable is False
    await tts.aclose()


@pytest.mark.asyncio
async def test_timeout_and_closed_engine(tiny_dir):
    hung = FailingEngine(None)
    tts = TTS(engine=hung)
    with pytest.raises(APITimeoutError):
        await tts.synthesize("Hello.", conn_options=APIConnectOptions(max_retry=0, timeout=0.2)).collect()
    closed = load_tiny(tiny_dir, max_batch=1)
    closed.close()
    stream = TTS(engine=closed).stream(conn_options=FAST)
    stream.push_text("Hello.")
    stream.end_input()
    with pytest.raises(APIConnectionError) as info:
        async for _ in stream:
            pass
    assert info.value.retryable is False


@pytest.mark.asyncio
async def test_remote_hung_request_times_out_and_is_cancelled(lk_server, monkeypatch):
    hung = FailingEngine(None)
    monkeypatch.setattr(lk_server.engine, "stream", hung.stream)
    tts = TTS(**lk_server.client_kwargs)
    with pytest.raises(APITimeoutError):
        await tts.synthesize("Hello.", conn_options=APIConnectOptions(max_retry=0, timeout=0.5)).collect()
    assert hung.calls == 1
    await wait_for(lambda: hung.cancelled, timeout=2.0)  # the timeout sent a cancel: the server dropped it
    await tts.aclose()


@pytest.mark.asyncio
async def test_remote_connection_failures_are_retryable(lk_server):
    nobody = TTS(url=f"ws://127.0.0.1:{free_port()}")  # nothing listens there
    errors = []
    nobody.on("error", errors.append)
    with pytest.raises(APIConnectionError) as info:
        await nobody.synthesize("Hello.", conn_options=FAST).collect()
    assert info.value.retryable is True
    assert "connection failed" in str(info.value)
    assert len(errors) == 2  # retried once (FAST: max_retry=1)
    assert errors[0].recoverable
    await nobody.aclose()
    wrong = TTS(url=lk_server.url, token="wrong")  # the server refuses the connection
    with pytest.raises(APIStatusError) as refused:
        await wrong.synthesize("Hello.", conn_options=FAST).collect()
    assert refused.value.status_code == 401
    assert refused.value.retryable is False
    await wrong.aclose()


@pytest.mark.asyncio
async def test_remote_mode_loads_nothing(lk_engine, lk_server, monkeypatch):
    import misotts_agents.engine.registry as registry

    def no_load(*args, **kwargs):
        raise AssertionError("url= must not load an engine")

    monkeypatch.setattr(registry, "shared_engine", no_load)
    monkeypatch.setenv("MISOTTS_TOKEN", lk_server.token)
    tts = TTS(url=lk_server.url, max_audio_ms=MAX_MS)  # the token from the environment
    remote = tts.load_engine()
    assert isinstance(remote, RemoteEngine)
    assert remote.token == lk_server.token
    tts.prewarm()  # opens the connection in this loop; loads nothing
    await wait_for(lambda: remote._ws is not None, timeout=5.0)
    frame = await tts.synthesize("Hello there.", conn_options=FAST).collect()
    assert frame.samples_per_channel % FRAME_SAMPLES == 0
    assert frame.samples_per_channel > 0
    await tts.aclose()
    assert remote.closed  # aclose() closed the TTS's own connection
    with pytest.raises(ValueError, match="not both"):
        TTS(engine=lk_engine, url=lk_server.url)
    await wait_for(lambda: lk_engine.free_slots == lk_engine.max_batch, timeout=2.0)


@pytest.mark.asyncio
async def test_failed_load_is_a_connection_error(tmp_path):
    tts = TTS(str(tmp_path / "missing"), device="cpu", watermark=False)
    with pytest.raises(APIError) as info:
        await tts.synthesize("Hello.", conn_options=FAST).collect()
    assert isinstance(info.value, APIConnectionError)
    assert info.value.retryable is False


# -- an AgentSession without a server ------------------------------------------------------------


def tone_frames(seconds: float, amplitude: float, freq: float = 220.0, ms: int = 20):
    n = RATE * ms // 1000
    t = np.arange(int(seconds * RATE)) / RATE
    pcm = (amplitude * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)
    for i in range(0, pcm.size - n + 1, n):
        yield rtc.AudioFrame(pcm[i : i + n].tobytes(), RATE, 1, n)


class QueueAudioInput(io.AudioInput):
    """A microphone: frames come out at real time, as they would from a room."""

    def __init__(self) -> None:
        super().__init__(label="test-input")
        self.queue: asyncio.Queue[rtc.AudioFrame] = asyncio.Queue()
        self._next_at = 0.0

    def speak(self, frames) -> None:
        for f in frames:
            self.queue.put_nowait(f)

    async def __anext__(self) -> rtc.AudioFrame:
        frame = await self.queue.get()
        self._next_at = max(self._next_at, time.monotonic()) + frame.duration
        await asyncio.sleep(max(0.0, self._next_at - time.monotonic()))
        return frame


class CaptureAudioOutput(io.AudioOutput):
    """Collects frames; 'plays' them instantly on flush, reports the captured part on clear."""

    def __init__(self) -> None:
        super().__init__(label="test-output", capabilities=io.AudioOutputCapabilities(pause=False))
        self.frames: list[rtc.AudioFrame] = []
        self._segment = 0.0
        self.first_frame = asyncio.Event()

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        if not self._segment:
            self.on_playback_started(created_at=time.time())
        self.frames.append(frame)
        self._segment += frame.duration
        self.first_frame.set()

    def flush(self) -> None:
        super().flush()
        if self._segment:
            self.on_playback_finished(playback_position=self._segment, interrupted=False)
            self._segment = 0.0

    def clear_buffer(self) -> None:
        if self._segment:
            self.on_playback_finished(playback_position=self._segment, interrupted=True)
            self._segment = 0.0


class LoudnessSTT(stt.STT):
    """A streaming STT that 'hears' loud audio: start/end of speech by level, a fixed transcript
    (final after ``final_at`` quiet 20 ms frames; with ``preflight_at``, a preflight one before)."""

    def __init__(self, transcript: str, final_at: int = 10, preflight_at: int | None = None) -> None:
        super().__init__(capabilities=stt.STTCapabilities(streaming=True, interim_results=preflight_at is not None))
        self.transcript = transcript
        self.final_at, self.preflight_at = final_at, preflight_at
        self.final_sent_at: float | None = None

    async def _recognize_impl(self, buffer, *, language=None, conn_options=None):
        raise NotImplementedError

    def stream(self, *, language=None, conn_options=FAST):
        return _LoudnessStream(stt=self, conn_options=conn_options, sample_rate=None)


class _LoudnessStream(stt.RecognizeStream):
    async def _run(self) -> None:
        speaking, quiet = False, 0
        async for frame in self._input_ch:
            if isinstance(frame, self._FlushSentinel):
                continue
            level = np.abs(np.frombuffer(frame.data, dtype=np.int16)).mean() / 32767
            if level > 0.05 and not speaking:
                speaking, quiet = True, 0
                self._event_ch.send_nowait(stt.SpeechEvent(type=stt.SpeechEventType.START_OF_SPEECH))
            elif level <= 0.05 and speaking:
                quiet += 1
                text = stt.SpeechData(language="en", text=self._stt.transcript)
                if quiet == self._stt.preflight_at:
                    kind = stt.SpeechEventType.PREFLIGHT_TRANSCRIPT
                    self._event_ch.send_nowait(stt.SpeechEvent(type=kind, alternatives=[text]))
                if quiet == self._stt.final_at:  # (200 ms of quiet by default) ends the turn
                    speaking = False
                    final = stt.SpeechEvent(type=stt.SpeechEventType.FINAL_TRANSCRIPT, alternatives=[text])
                    self._stt.final_sent_at = time.monotonic()
                    self._event_ch.send_nowait(final)
                    self._event_ch.send_nowait(stt.SpeechEvent(type=stt.SpeechEventType.END_OF_SPEECH))


class ScriptedLLM(llm.LLM):
    """Replies with the next scripted text, in a few chunks."""

    def __init__(self, replies: list[str]) -> None:
        super().__init__()
        self.replies = list(replies)

    def chat(self, *, chat_ctx, tools=None, conn_options=FAST, **_kwargs):
        return _ScriptedStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class _ScriptedStream(llm.LLMStream):
    async def _run(self) -> None:
        text = self._llm.replies.pop(0) if self._llm.replies else "Okay."
        for i, word in enumerate(text.split(" ")):
            delta = llm.ChoiceDelta(role="assistant", content=word if i == 0 else " " + word)
            self._event_ch.send_nowait(llm.ChatChunk(id=utils.shortuuid(), delta=delta))


class ToneAgent(MisoToneMixin, Agent):
    def __init__(self) -> None:
        super().__init__(instructions="test")


async def start_session(
    tts: TTS, replies: list[str], transcript: str = "Where is my parcel?", stt_node: stt.STT | None = None, **options
):
    session = AgentSession(
        stt=stt_node or LoudnessSTT(transcript),
        llm=ScriptedLLM(replies),
        tts=tts,
        vad=None,
        turn_handling={
            "turn_detection": "stt",
            "endpointing": {"min_delay": 0.0, "max_delay": 0.5},
            "preemptive_generation": options.pop("preemptive", {"enabled": False}),
        },
        aec_warmup_duration=None,
        **options,
    )
    audio_in, audio_out = QueueAudioInput(), CaptureAudioOutput()
    session.input.audio = audio_in
    session.output.audio = audio_out
    await session.start(ToneAgent())
    return session, audio_in, audio_out


@pytest.mark.asyncio
async def test_session_user_turn_reaches_the_prompt(mode, monkeypatch):
    lk_engine = mode.engine
    rec = Recorder(lk_engine, monkeypatch)
    tts = TTS(**mode.kwargs, max_audio_ms=MAX_MS)
    session, audio_in, audio_out = await start_session(tts, ["Let me check that for you."])
    try:
        audio_in.speak([*tone_frames(0.3, 0.0), *tone_frames(1.0, 0.3), *tone_frames(0.6, 0.0)])
        await wait_for(lambda: rec.requests and session.agent_state == "listening" and audio_out.frames, 30)
        user = [s for s in rec.requests[0].context if s.speaker == 1]
        assert len(user) == 1
        assert user[0].text == "Where is my parcel?"
        assert 0.9 <= user[0].audio.size / RATE <= 1.6  # the 1 s turn (+ pre-roll and the quiet tail)
        assert np.abs(user[0].audio).max() > 0.2  # the real frames, not silence
        played = sum(f.samples_per_channel for f in audio_out.frames)
        assert played % FRAME_SAMPLES == 0
        assert played > 0
        # the agent's reply is remembered for the next one (voice continuity)
        memory = tone_for(session).memory
        await wait_for(lambda: any(s.speaker == 0 for s in memory.context()), 5)
        agent = next(s for s in memory.context() if s.speaker == 0)
        assert agent.text == "Let me check that for you."
        assert agent.audio.size == played  # (one word a request)
    finally:
        await session.aclose()
        await tts.aclose()
    await wait_for(lambda: lk_engine.free_slots == lk_engine.max_batch, timeout=1.0)


@pytest.mark.asyncio
async def test_session_interruption_cancels_and_cuts_the_turn(mode):
    lk_engine = mode.engine
    tts = TTS(**mode.kwargs, max_audio_ms=4000)
    session, _, audio_out = await start_session(tts, [])
    before = lk_engine.metrics().cancelled
    try:
        handle = session.say("This is a long answer that the user will not let me finish at all.")
        await asyncio.wait_for(audio_out.first_frame.wait(), 20)
        await asyncio.sleep(0.1)
        handle.interrupt()
        await handle.wait_for_playout()
        assert handle.interrupted
        await wait_for(lambda: lk_engine.free_slots == lk_engine.max_batch, timeout=2.0)
        assert lk_engine.metrics().cancelled == before + 1
        memory = tone_for(session).memory
        await wait_for(lambda: bool(memory.context()), 5)
        (turn,) = memory.context()
        played = sum(f.samples_per_channel for f in audio_out.frames)
        # exactly what was played (the position LiveKit reports), whatever more had been generated,
        # and the words that started in it
        assert turn.audio.size == played > 0
        said = "This is a long answer that the user will not let me finish at all."
        assert said.startswith(turn.text)
        assert 0 < len(turn.text.split()) < len(said.split())
    finally:
        await session.aclose()
        await tts.aclose()


@pytest.mark.asyncio
async def test_preemptive_reply_hears_the_user_turn_so_far(mode, monkeypatch):
    """With preemptive TTS the reply is synthesized on the preflight transcript, before the turn is
    confirmed: it is conditioned on the user's audio so far and that transcript (it had no user turn)."""
    times: list[float] = []
    rec = Recorder(mode.engine, monkeypatch)
    real = mode.engine.stream

    def timed(request, **options):
        times.append(time.monotonic())
        return real(request, **options)

    monkeypatch.setattr(mode.engine, "stream", timed)
    ear = LoudnessSTT("Where is my parcel?", final_at=50, preflight_at=3)  # the final comes 1 s after
    tts = TTS(**mode.kwargs, max_audio_ms=MAX_MS)
    preemptive = {"enabled": True, "preemptive_tts": True}
    session, audio_in, audio_out = await start_session(tts, ["Checking."], stt_node=ear, preemptive=preemptive)
    try:
        audio_in.speak([*tone_frames(0.3, 0.0), *tone_frames(1.0, 0.3), *tone_frames(1.2, 0.0)])
        await wait_for(lambda: audio_out.frames and ear.final_sent_at and session.agent_state == "listening", 30)
        assert times
        assert times[0] < ear.final_sent_at  # synthesized before the turn was confirmed...
        for request in rec.requests:  # ...and still hearing it
            (user,) = [s for s in request.context if s.speaker == 1]
            assert user.text == "Where is my parcel?"
            assert 0.9 <= user.audio.size / RATE <= 1.6
            assert np.abs(user.audio).max() > 0.2
    finally:
        await session.aclose()
        await tts.aclose()


@pytest.mark.asyncio
async def test_interrupted_turn_with_aligned_transcript(mode):
    """``use_tts_aligned_transcript``: LiveKit's transcript of an interrupted reply comes from our word
    timings; the memory keeps exactly the audio played and the words that started in it."""
    tts = TTS(**mode.kwargs, max_audio_ms=4000)
    session, _, audio_out = await start_session(tts, [], use_tts_aligned_transcript=True)
    said = "This is a long answer that the user will not let me finish at all."
    try:
        handle = session.say(said)
        await asyncio.wait_for(audio_out.first_frame.wait(), 20)
        await asyncio.sleep(0.3)
        handle.interrupt()
        await handle.wait_for_playout()
        memory = tone_for(session).memory
        await wait_for(lambda: bool(memory.context()), 5)
        (turn,) = memory.context()
        played = sum(f.samples_per_channel for f in audio_out.frames)
        assert turn.audio.size == played
        assert said.startswith(turn.text)
        assert turn.text != said
        (message,) = [m for m in session.history.messages() if m.role == "assistant"]
        assert message.interrupted
        assert said.startswith(message.text_content.strip())
    finally:
        await session.aclose()
        await tts.aclose()


# -- options, streams' lifetime, retries, timeouts, long sentences ------------------------------


def test_every_option_is_checked_at_construction_and_update(lk_engine):
    bad = [
        {"speaker": -1},
        {"max_ahead_s": -1.0},
        {"topk": 0},
        {"temperature": 0.0},
        {"max_audio_ms": 10},
        {"voice": "not a VoicePrompt"},
        {"tone_conditioning": "yes"},
        {"memory": object()},
        {"sentence_tokenizer": object()},
    ]
    for kwargs in bad:  # each refusal names the option it refuses
        with pytest.raises(ValueError, match=f"^{next(iter(kwargs))} must be"):
            TTS(engine=lk_engine, **kwargs)
    tts = TTS(engine=lk_engine, topk=7)
    for kwargs in bad[:6]:
        with pytest.raises(ValueError, match=f"^{next(iter(kwargs))} must be"):
            tts.update_options(**kwargs)
    assert tts._opts.topk == 7
    assert tts._opts.speaker == 0
    assert tts._opts.max_ahead_s is None  # unchanged


@pytest.mark.asyncio
async def test_voice_none_returns_to_the_default_voice(lk_engine, monkeypatch):
    rec = Recorder(lk_engine, monkeypatch)
    voice = VoicePrompt(0, "This is my voice.", tone(0.5), RATE)
    tts = TTS(engine=lk_engine, max_audio_ms=160, voice=voice)
    tts.update_options(temperature=0.5)  # options not given keep their value
    await tts.synthesize("One.", conn_options=FAST).collect()
    tts.update_options(voice=None, max_ahead_s=2.0)
    await tts.synthesize("Two.", conn_options=FAST).collect()
    first, second = rec.requests
    assert first.voice is voice
    assert first.temperature == 0.5
    assert second.voice is None
    assert second.max_ahead_s == 2.0
    assert second.temperature == 0.5


@pytest.mark.asyncio
async def test_nothing_is_kept_after_a_stream_ends_however_it_ends(mode):
    tts = TTS(**mode.kwargs, max_audio_ms=4000)

    async def finished():
        async with tts.stream(conn_options=FAST) as stream:  # as Agent.default.tts_node uses it
            stream.push_text("Hi.")
            stream.end_input()
            async for _ in stream:
                pass
        return stream

    async def interrupted():
        stream = tts.stream(conn_options=FAST)
        stream.push_text("A long sentence that the user interrupts half way through.")
        stream.end_input()
        await stream.__anext__()
        await stream.aclose()  # LiveKit's barge-in
        return stream

    async def failed():
        stream = tts.stream(conn_options=FAST)
        stream.push_text("Hello.")
        stream.end_input()
        try:
            async for _ in stream:
                pass
        except APIStatusError:
            pass  # (not kept: pytest.raises would keep the traceback, and the stream with it)
        await stream.aclose()
        return stream

    async def one_shot():
        chunked = tts.synthesize("Hello there.", conn_options=FAST)
        await chunked.__anext__()
        await chunked.aclose()
        return chunked

    engine = tts._engine
    for end in (finished, interrupted, failed, one_shot):
        tts._engine = FailingEngine(InvalidRequest("bad")) if end is failed else engine  # failed: refused
        stream = await end()
        ref = weakref.ref(stream)
        del stream
        await wait_for(lambda: tts.running_streams == 0, timeout=2.0)
        gc.collect()
        assert ref() is None, end.__name__  # not referenced by the TTS (nor anything else)
    await wait_for(lambda: mode.engine.free_slots == mode.engine.max_batch, timeout=2.0)
    await tts.aclose()


@pytest.mark.asyncio
async def test_aclose_ends_one_shot_requests_too(mode):
    engine = mode.engine
    tts = TTS(**mode.kwargs, max_audio_ms=8000)
    chunked = tts.synthesize("A long one-shot answer nobody waits for.", conn_options=FAST)
    await chunked.__anext__()  # generating
    assert tts.running_streams == 1
    assert engine.free_slots < engine.max_batch
    await tts.aclose()
    assert chunked.done
    assert tts.running_streams == 0
    await wait_for(lambda: engine.free_slots == engine.max_batch, timeout=2.0)


class ScriptedEngine:
    """Answers every request at once with ``seconds`` of audio (at most its max_audio_ms) carrying
    its words, as the engine times them; request number ``fail_at`` is refused as busy (retryable)."""

    def __init__(self, seconds: float = 0.32, fail_at: int | None = None) -> None:
        self.seconds, self.fail_at = seconds, fail_at
        self.requests: list[SynthesisRequest] = []

    def stream(self, request, **options):
        self.requests.append(request)
        if len(self.requests) - 1 == self.fail_at:
            raise EngineBusy("engine busy: test")
        frames = min(round(self.seconds * 12.5), request.max_frames)
        cut = frames == request.max_frames
        words = WordAligner(request.text).advance(frames * 0.08, ended=not cut)
        return _Once(AudioChunk(tone(frames * 0.08), 0, frames, True, words=words))


class _Once(AdmittedAtOnce):
    def __init__(self, chunk: AudioChunk) -> None:
        self.chunk = chunk

    def cancel(self) -> None:
        pass

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.chunk is None:
            raise StopAsyncIteration
        chunk, self.chunk = self.chunk, None
        return chunk


@pytest.mark.asyncio
async def test_a_retry_starts_from_a_clean_state():
    """A one-shot text of two sentences: the second fails (busy, retryable) after the first was spoken;
    LiveKit retries the whole text. The retry's first sentence is conditioned on nothing of the failed
    attempt (it was, before: on the failed attempt's first sentence)."""
    engine = ScriptedEngine(fail_at=1)
    tts = TTS(engine=engine, tone_conditioning=False)
    errors = []
    tts.on("error", errors.append)
    await tts.synthesize("First sentence here. Second sentence here.", conn_options=FAST).collect()
    assert [r.text for r in engine.requests] == ["First sentence here.", "Second sentence here."] * 2
    first, _failed, retry_first, retry_second = engine.requests
    assert first.context == ()
    assert retry_first.context == ()  # a clean start
    assert [s.text for s in retry_second.context] == ["First sentence here."]  # the retry's own first sentence
    assert len(errors) == 1
    assert errors[0].recoverable


class QueuedStream:
    """A request that waits ``queued_s`` for an engine slot (saying so), then speaks at once."""

    def __init__(self, queued_s: float) -> None:
        self.admitted_at = time.monotonic() + queued_s
        self.stats = StreamStats()
        self.codes = np.zeros((0, 32), dtype=np.int64)
        self.sent = False

    @property
    def queued(self) -> bool:
        return time.monotonic() < self.admitted_at

    async def wait_admitted(self) -> bool:
        await asyncio.sleep(max(0.0, self.admitted_at - time.monotonic()))
        return True

    def cancel(self) -> None:
        pass

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.sent:
            raise StopAsyncIteration
        await asyncio.sleep(max(0.0, self.admitted_at - time.monotonic()) + 0.05)
        self.sent = True
        return AudioChunk(np.zeros(FRAME_SAMPLES, dtype=np.float32), 0, 1, True)


@pytest.mark.asyncio
async def test_timeout_starts_when_the_request_leaves_the_queue(mode, monkeypatch):
    """Queued for 1 s behind other conversations, with a 0.4 s timeout: not a timeout (it was, before,
    and the retry went to the back of the queue). A request that does not say it is queued still
    times out."""
    monkeypatch.setattr(mode.engine, "stream", lambda request, **options: QueuedStream(1.0))
    tts = TTS(**mode.kwargs)
    frame = await tts.synthesize("Hello.", conn_options=APIConnectOptions(max_retry=0, timeout=0.4)).collect()
    assert frame.samples_per_channel == FRAME_SAMPLES
    await tts.aclose()


@pytest.mark.asyncio
async def test_long_sentences_are_split_at_clauses_and_a_cut_is_reported(caplog):
    said = "When the parcel arrives, and it will arrive soon, please check the box; then call us back."
    spoken = ScriptedEngine(seconds=1.6)  # each part ends by itself, within the cap
    tts = TTS(engine=spoken, max_audio_ms=4_000, tone_conditioning=False)
    with caplog.at_level(logging.WARNING, logger="misotts_agents.livekit"):
        await tts.synthesize(said, conn_options=FAST).collect()
    texts = [r.text for r in spoken.requests]
    assert " ".join(texts) == said
    assert len(texts) > 1
    assert all(t.endswith((",", ";", ".")) for t in texts)  # at clause ends, not inside a phrase
    assert all(estimated_duration_s(t) <= 4.0 * SPLIT_SHARE for t in texts)
    assert not [r for r in caplog.records if "cut a sentence short" in r.getMessage()]
    # a part the cap still cuts (the model spoke slower than expected) is reported, with what was lost
    slow = ScriptedEngine(seconds=10.0)
    await TTS(engine=slow, max_audio_ms=4_000, tone_conditioning=False).synthesize(said, conn_options=FAST).collect()
    warnings = [r.getMessage() for r in caplog.records if "cut a sentence short" in r.getMessage()]
    assert len(warnings) == len(slow.requests)


# -- one engine for a process-per-job worker: the inference process ------------------------------


class InProcessExecutor:
    """What the worker does, without processes: method -> runner.run, one request at a time."""

    def __init__(self, runner: MisoInferenceRunner) -> None:
        self.runner = runner
        self.lock = asyncio.Lock()
        self.sizes: list[int] = []

    async def do_inference(self, method: str, data: bytes) -> bytes | None:
        assert method == MisoInferenceRunner.INFERENCE_METHOD
        self.sizes.append(len(data))
        async with self.lock:
            return await asyncio.to_thread(self.runner.run, data)


@pytest.mark.asyncio
async def test_inference_process_path(lk_engine):
    runner = MisoInferenceRunner(engine=lk_engine)
    runner.initialize()
    executor = InProcessExecutor(runner)
    with fake_job_context(inference_executor=executor):
        remote = InferenceEngine()  # finds ctx.inference_executor
        tts = TTS(engine=remote, max_audio_ms=MAX_MS)
        session, audio_in, audio_out = await start_session(tts, ["Sure.", "Done."])
        try:
            audio_in.speak([*tone_frames(0.2, 0.0), *tone_frames(0.8, 0.3), *tone_frames(0.5, 0.0)])
            await wait_for(lambda: session.agent_state == "listening" and audio_out.frames, 30)
            first = sum(f.samples_per_channel for f in audio_out.frames)
            assert first > 0
            assert first % FRAME_SAMPLES == 0
            sent_before = len(remote._sent)
            assert sent_before >= 1  # the user's turn audio went over once
            # a second reply: the user's turn (>= 1 s, 48 kB) is in the runner's cache, only its hash
            # goes over; the agent's first reply (<= 0.48 s) is new and sent once
            executor.sizes.clear()
            session.say("Again.")
            await wait_for(lambda: sum(f.samples_per_channel for f in audio_out.frames) > first, 20)
            assert max(executor.sizes) < 2 * RATE * MAX_MS // 1000 + 4096
        finally:
            await session.aclose()
        # cancellation through the IPC
        before = lk_engine.metrics().cancelled
        stream = TTS(engine=remote, max_audio_ms=4000).stream(conn_options=FAST)
        stream.push_text("A long sentence to cancel half way through, please.")
        stream.end_input()
        await stream.__anext__()
        await stream.aclose()
        await wait_for(lambda: lk_engine.free_slots == lk_engine.max_batch, timeout=2.0)
        assert lk_engine.metrics().cancelled == before + 1
        assert not runner._active


@pytest.mark.asyncio
async def test_inference_context_audio_arrives_as_24k_mono(lk_engine):
    """Context audio at another rate, in two channels, reaches the runner's engine as 24 kHz mono."""
    received = []

    class Spy:
        def stream(self, request, **options):
            received.append(request)
            return lk_engine.stream(request, **options)

    runner = MisoInferenceRunner(engine=Spy())
    stereo = np.stack([tone(0.5, 48_000, 200), tone(0.5, 48_000, 300)])  # (channels, samples) at 48 kHz
    request = SynthesisRequest("Hello.", context=(Segment(1, "Hi.", stereo, 48_000),), max_audio_ms=160, seed=0)
    async for _ in InferenceEngine(InProcessExecutor(runner)).stream(request):
        pass
    (seg,) = received[0].context
    expected = to_mono(stereo, 48_000)
    assert seg.sample_rate == RATE
    assert seg.audio.shape == expected.shape == (12_000,)
    np.testing.assert_allclose(seg.audio, expected, atol=1 / 32767)  # int16 on the way


@pytest.mark.asyncio
async def test_inference_process_stream_learns_its_admission_from_the_polls(lk_engine):
    """Admitted (True) while it is iterated, with the engine's figures at the end; a request the
    inference process cannot run ends without a slot (False)."""
    stream = InferenceEngine(InProcessExecutor(MisoInferenceRunner(engine=lk_engine))).stream(
        SynthesisRequest("Hello.", max_audio_ms=160, seed=0)
    )
    admission = asyncio.ensure_future(stream.wait_admitted())
    frames = sum([chunk.frames async for chunk in stream])
    assert await asyncio.wait_for(admission, 5) is True
    assert stream.stats.frames == frames == 2
    assert stream.stats.stop_reason == "max_frames"
    refused = InferenceEngine(InProcessExecutor(MisoInferenceRunner())).stream(SynthesisRequest("Hello."))
    with pytest.raises(ModelSourceError):
        async for _ in refused:
            pass
    assert await asyncio.wait_for(refused.wait_admitted(), 1) is False


@pytest.mark.asyncio
async def test_inference_errors_come_back_typed(lk_engine):
    runner = MisoInferenceRunner()  # initialize() never ran: no engine in the process
    tts = TTS(engine=InferenceEngine(InProcessExecutor(runner)))
    with pytest.raises(APIConnectionError) as info:
        await tts.synthesize("Hello.", conn_options=FAST).collect()
    assert info.value.retryable is False

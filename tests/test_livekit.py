"""LiveKit integration: streaming TTS on a tiny checkpoint, an AgentSession without a server (fake
STT/LLM, captured audio), interruption, tone context, errors, and the inference-process path.

The tests where the engine path matters run twice (``mode``): with the engine in process, and with
``url=`` against a loopback ``misotts-agents serve`` of the same engine (spies on ``lk_engine.stream``
then see the request as it reached the server)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
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
from livekit.agents.voice import Agent, AgentSession, io
from remote_server import free_port, mode_fixture, server_fixture
from signals import tone

from misotts_agents.audio import FRAME_SAMPLES, to_mono
from misotts_agents.engine.facade import MisoEngine
from misotts_agents.engine.request import Segment, StreamStats, SynthesisRequest
from misotts_agents.errors import EngineBusy, EngineClosed, InvalidRequest, ModelSourceError
from misotts_agents.livekit import TTS, InferenceEngine, MisoInferenceRunner, MisoToneMixin, map_error, tone_for
from misotts_agents.server import RemoteConnectionError, RemoteEngine, RemoteError

RATE = 24_000
MAX_MS = 480  # at most 6 frames per sentence keeps the file fast
FAST = APIConnectOptions(max_retry=1, retry_interval=0.01, timeout=20.0)


@pytest.fixture(scope="module")
def lk_engine(tiny_dir: Path):
    engine = MisoEngine.load(tiny_dir, device="cpu", watermark=False, max_batch=2, progress=False)
    yield engine
    engine.close()


lk_server = server_fixture("lk_engine")  # one loopback server of ``lk_engine`` for the file, started on first use
mode = mode_fixture("lk_engine", "lk_server")  # "local": engine=lk_engine; "remote": url= of lk_server


class Recorder:
    """Wraps ``engine.stream`` (in place) to keep every SynthesisRequest the engine receives: in remote
    mode, the request as the server parsed it from the wire."""

    def __init__(self, engine: MisoEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.requests = []
        real = engine.stream

        def stream(request):
            self.requests.append(request)
            return real(request)

        monkeypatch.setattr(engine, "stream", stream)


async def wait_for(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.01)


def check_events(events, *, streamed: bool) -> None:
    """The rules LiveKit's own TTS tests check on emitted audio."""
    assert events
    assert len({e.request_id for e in events}) == 1 and events[0].request_id
    assert [e.is_final for e in events].count(True) == 1 and events[-1].is_final
    assert events[-1].frame.duration < 0.25
    for e in events:
        assert e.frame.sample_rate == RATE and e.frame.num_channels == 1
    if streamed:
        assert all(e.segment_id for e in events) and len({e.segment_id for e in events}) == 1


def samples(events) -> int:
    return sum(e.frame.samples_per_channel for e in events)


# -- the TTS alone ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_stream_pushes_frames_as_generated(mode):
    lk_engine = mode.engine
    tts = TTS("tiny", **mode.kwargs, max_audio_ms=MAX_MS, topk=1)
    assert tts.capabilities.streaming and tts.sample_rate == RATE and tts.num_channels == 1
    assert tts.model == "tiny" and tts.provider == "misotts"
    stream = tts.stream(conn_options=FAST)
    for word in ["Hello there, ", "this is a ", "test of streaming."]:
        stream.push_text(word)
    stream.end_input()
    events = [ev async for ev in stream]
    check_events(events, streamed=True)
    total = samples(events)
    assert total % FRAME_SAMPLES == 0 and 0 < total <= 2 * MAX_MS * RATE // 1000  # 80 ms per frame
    assert events[0].frame.duration <= 0.1  # first audio leaves after the first frame
    await wait_for(lambda: lk_engine.free_slots == lk_engine.max_batch, timeout=1.0)
    await tts.aclose()


@pytest.mark.asyncio
async def test_synthesize_one_shot(lk_engine):
    tts = TTS(engine=lk_engine, max_audio_ms=MAX_MS)
    events = [ev async for ev in tts.synthesize("One short sentence.", conn_options=FAST)]
    check_events(events, streamed=False)
    assert samples(events) % FRAME_SAMPLES == 0
    frame = await tts.synthesize("Again.", conn_options=FAST).collect()
    assert frame.sample_rate == RATE and frame.samples_per_channel % FRAME_SAMPLES == 0


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
    ]
    for exc, kind, retryable in cases:
        mapped = map_error(exc)
        assert isinstance(mapped, kind) and mapped.retryable is retryable, exc


class FailingEngine:
    def __init__(self, exc: Exception | None) -> None:
        self.exc = exc
        self.calls = 0
        self.stats = StreamStats()  # read by the server when the request ends (remote mode)
        self.cancelled = False

    def stream(self, request):
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
    closed = MisoEngine.load(tiny_dir, device="cpu", watermark=False, max_batch=1, progress=False)
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
    assert info.value.retryable is True and "connection failed" in str(info.value)
    assert len(errors) == 2 and errors[0].recoverable  # retried once (FAST: max_retry=1)
    await nobody.aclose()
    wrong = TTS(url=lk_server.url, token="wrong")  # the server refuses the connection
    with pytest.raises(APIStatusError) as refused:
        await wrong.synthesize("Hello.", conn_options=FAST).collect()
    assert refused.value.status_code == 401 and refused.value.retryable is False
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
    assert isinstance(remote, RemoteEngine) and remote.token == lk_server.token
    tts.prewarm()  # opens the connection in this loop; loads nothing
    await wait_for(lambda: remote._ws is not None, timeout=5.0)
    frame = await tts.synthesize("Hello there.", conn_options=FAST).collect()
    assert frame.samples_per_channel % FRAME_SAMPLES == 0 and frame.samples_per_channel > 0
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
    assert isinstance(info.value, APIConnectionError) and info.value.retryable is False


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
    """A streaming STT that 'hears' loud audio: start/end of speech by level, a fixed transcript."""

    def __init__(self, transcript: str) -> None:
        super().__init__(capabilities=stt.STTCapabilities(streaming=True, interim_results=False))
        self.transcript = transcript

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
                if quiet == 10:  # 200 ms of quiet ends the turn
                    speaking = False
                    text = stt.SpeechData(language="en", text=self._stt.transcript)
                    final = stt.SpeechEvent(type=stt.SpeechEventType.FINAL_TRANSCRIPT, alternatives=[text])
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


async def start_session(tts: TTS, replies: list[str], transcript: str = "Where is my parcel?"):
    session = AgentSession(
        stt=LoudnessSTT(transcript),
        llm=ScriptedLLM(replies),
        tts=tts,
        vad=None,
        turn_handling={
            "turn_detection": "stt",
            "endpointing": {"min_delay": 0.0, "max_delay": 0.5},
            "preemptive_generation": {"enabled": False},
        },
        aec_warmup_duration=None,
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
        assert len(user) == 1 and user[0].text == "Where is my parcel?"
        assert 0.9 <= user[0].audio.size / RATE <= 1.6  # the 1 s turn (+ pre-roll and the quiet tail)
        assert np.abs(user[0].audio).max() > 0.2  # the real frames, not silence
        played = sum(f.samples_per_channel for f in audio_out.frames)
        assert played % FRAME_SAMPLES == 0 and played > 0
        # the agent's reply is remembered for the next one (voice continuity)
        memory = tone_for(session).memory
        await wait_for(lambda: any(s.speaker == 0 for s in memory.context()), 5)
        agent = next(s for s in memory.context() if s.speaker == 0)
        assert agent.text == "Let me check that for you." and agent.audio.size == played
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
        generated = sum(f.samples_per_channel for f in audio_out.frames)
        assert 0 < turn.audio.size <= generated  # cut to what was played
    finally:
        await session.aclose()
        await tts.aclose()


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
            assert first > 0 and first % FRAME_SAMPLES == 0
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
        def stream(self, request):
            received.append(request)
            return lk_engine.stream(request)

    runner = MisoInferenceRunner(engine=Spy())
    stereo = np.stack([tone(0.5, 48_000, 200), tone(0.5, 48_000, 300)])  # (channels, samples) at 48 kHz
    request = SynthesisRequest("Hello.", context=(Segment(1, "Hi.", stereo, 48_000),), max_audio_ms=160, seed=0)
    async for _ in InferenceEngine(InProcessExecutor(runner)).stream(request):
        pass
    (seg,) = received[0].context
    expected = to_mono(stereo, 48_000)
    assert seg.sample_rate == RATE and seg.audio.shape == expected.shape == (12_000,)
    np.testing.assert_allclose(seg.audio, expected, atol=1 / 32767)  # int16 on the way


@pytest.mark.asyncio
async def test_inference_errors_come_back_typed(lk_engine):
    runner = MisoInferenceRunner()  # initialize() never ran: no engine in the process
    tts = TTS(engine=InferenceEngine(InProcessExecutor(runner)))
    with pytest.raises(APIConnectionError) as info:
        await tts.synthesize("Hello.", conn_options=FAST).collect()
    assert info.value.retryable is False

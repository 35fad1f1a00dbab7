"""The engine server over loopback: WebSocket protocol, OpenAI speech, auth, limits, RemoteEngine."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest
from engines import load_tiny
from remote_server import LoopbackServer
from server_client import collect, free, http_url, next_json, start, ws_url
from signals import tone, wait_until
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from misotts_agents.audio import FRAME_SAMPLES, to_int16
from misotts_agents.engine.request import Segment, SynthesisRequest
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.engine.words import WordAligner
from misotts_agents.errors import EngineBusy, InvalidRequest
from misotts_agents.model.config import NUM_CODEBOOKS
from misotts_agents.server import Limits, RemoteEngine, protocol
from misotts_agents.server.protocol import audio_to_b64, unpack_audio
from misotts_agents.server.tenants import Tenants, check_bind

TOKEN = "s3cret"
LIMITS = Limits(
    max_text_chars=500,
    max_concurrent_per_connection=6,
    max_sessions_per_connection=3,
    max_message_bytes=200_000,
    ws_max_size=400_000,
)
ANNA = VoicePrompt(0, "I am Anna.", tone(0.5, freq=190))


def said(text: str, frames: int) -> str:
    """The words of a request cut at ``frames`` that had started (the engine's word timings)."""
    return " ".join(w.word for w in WordAligner(text).advance(frames * 0.08))


@pytest.fixture(scope="module")
def srv_engine(tiny_dir):
    with load_tiny(tiny_dir, max_batch=2) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(srv_engine):
    with LoopbackServer(srv_engine, token=None, limits=LIMITS) as s:
        yield s


@pytest.fixture(scope="module")
def secured(srv_engine):
    with LoopbackServer(srv_engine, token=TOKEN, limits=LIMITS) as s:
        yield s


@pytest.fixture(scope="module")
def voiced(srv_engine):
    with LoopbackServer(srv_engine, token=None, limits=LIMITS, voices={"anna": ANNA}) as s:
        yield s


def backend_of(s: LoopbackServer):
    return s.app.state.backend


@pytest.fixture
def engine_requests(srv_engine, monkeypatch) -> list[SynthesisRequest]:
    """Every request the server hands the engine (the server calls it from its own thread)."""
    seen: list[SynthesisRequest] = []
    real = srv_engine.stream

    def spy(request, **options):
        seen.append(request)
        return real(request, **options)

    monkeypatch.setattr(srv_engine, "stream", spy)
    return seen


@pytest.mark.asyncio
async def test_round_trip_with_context(server, srv_engine):
    ctx = [{"speaker": 1, "text": "Why so slow?", "audio_b64": audio_to_b64(tone(0.5, freq=300))}]
    async with connect(ws_url(server)) as ws:
        await ws.send(start("a", 6, context=ctx, codes=True))
        audio, ends = await collect(ws, {"a"})
    end = ends["a"]
    assert end["type"] == "end"
    assert end["stats"]["frames"] == 6
    assert end["stats"]["stop_reason"] == "max_frames"
    assert end["stats"]["prompt_frames"] > 8
    assert len(end["codes"]) == 6
    chunks = audio["a"]
    assert [c[0] for c in chunks] == [0, 1, 3]
    assert chunks[-1][2]
    assert all(len(pcm) == 2 * frames * FRAME_SAMPLES for _, frames, _, pcm in chunks)
    assert sum(len(c[3]) for c in chunks) == 2 * 6 * FRAME_SAMPLES
    assert free(srv_engine)


@pytest.mark.asyncio
async def test_two_concurrent_requests_on_one_connection(server, srv_engine):
    async with connect(ws_url(server)) as ws:
        await ws.send(start("x", 5, seed=1))
        await ws.send(start("y", 7, seed=2))
        audio, ends = await collect(ws, {"x", "y"})
    assert ends["x"]["stats"]["frames"] == 5
    assert ends["y"]["stats"]["frames"] == 7
    assert sum(len(c[3]) for c in audio["x"]) == 2 * 5 * FRAME_SAMPLES
    assert sum(len(c[3]) for c in audio["y"]) == 2 * 7 * FRAME_SAMPLES
    assert free(srv_engine)


@pytest.mark.asyncio
async def test_cancel_frees_the_slot(server, srv_engine):
    async with connect(ws_url(server)) as ws:
        await ws.send(start("long", 400))
        async with asyncio.timeout(20):
            first = await ws.recv()
        assert isinstance(first, bytes)
        assert unpack_audio(first)[0] == "long"
        await ws.send(json.dumps({"type": "cancel", "id": "long"}))
        _, ends = await collect(ws, {"long"})
        assert ends["long"]["type"] == "end"
        assert ends["long"]["stats"]["stop_reason"] == "cancelled"
        assert free(srv_engine)
        await ws.send(json.dumps({"type": "cancel", "id": "nope"}))  # unknown ids are ignored
        await ws.send(json.dumps({"type": "ping"}))
        async with asyncio.timeout(10):
            assert json.loads(await ws.recv())["type"] == "pong"


@pytest.mark.asyncio
async def test_disconnect_mid_utterance_frees_the_slot(server, srv_engine):
    ws = await connect(ws_url(server))
    await ws.send(start("gone", 400))
    await ws.send(start("gone2", 400))
    async with asyncio.timeout(20):
        assert isinstance(await ws.recv(), bytes)
    assert srv_engine.free_slots < srv_engine.max_batch
    await ws.close()
    assert await asyncio.to_thread(free, srv_engine)


@pytest.mark.asyncio
async def test_bad_messages_get_errors_and_the_connection_keeps_working(server, srv_engine):
    async with connect(ws_url(server)) as ws:
        await ws.send("{not json")
        assert (await next_json(ws))["code"] == "bad_json"
        await ws.send(json.dumps([1, 2]))
        assert (await next_json(ws))["code"] == "bad_message"
        await ws.send(json.dumps({"type": "dance"}))
        assert (await next_json(ws))["code"] == "unknown_type"
        await ws.send(json.dumps({"type": "start", "id": "t", "text": "x" * 600}))
        err = await next_json(ws)
        assert err["code"] == "too_large"
        assert err["id"] == "t"
        assert "'text': too long" in err["message"]
        await ws.send(json.dumps({"type": "start", "id": "t", "text": "hi", "topk": 0}))
        assert (await next_json(ws))["code"] == "invalid_request"
        bad_audio = [{"speaker": 1, "text": "hm", "audio_b64": "!!!"}]
        await ws.send(json.dumps({"type": "start", "id": "t", "text": "hi", "context": bad_audio}))
        assert (await next_json(ws))["code"] == "invalid_request"
        big = [{"speaker": 1, "text": "hm", "audio_b64": "A" * 250_000}]  # over the app's message limit
        await ws.send(json.dumps({"type": "start", "id": "t", "text": "hi", "context": big}))
        assert (await next_json(ws))["code"] == "too_large"
        await ws.send(json.dumps({"type": "append", "id": "t", "text": "more"}))  # no such incremental request
        assert (await next_json(ws))["code"] == "bad_message"
        await ws.send(json.dumps({"type": "session", "op": "clear"}))
        assert (await next_json(ws))["code"] == "invalid_request"
        await ws.send(json.dumps({"type": "session", "session": "s", "op": "dance"}))
        assert (await next_json(ws))["code"] == "invalid_request"
        await ws.send(json.dumps({"type": "session", "session": "s", "op": "user_turn", "text": "hm"}))
        assert (await next_json(ws))["code"] == "invalid_request"  # no audio
        await ws.send(json.dumps({"type": "start", "id": "t", "text": "hi", "voice": "nobody"}))
        err = await next_json(ws)
        assert err["code"] == "invalid_request"
        assert "unknown voice" in err["message"]
        await ws.send(b"\x00binary")
        assert (await next_json(ws))["code"] == "bad_message"
        for i in range(LIMITS.max_concurrent_per_connection + 1):
            await ws.send(start(f"n{i}", 200))
        await ws.send(start("n0", 3))
        errors = {}
        while len(errors) < 2:
            msg = await next_json(ws)
            if msg["type"] == "error":
                errors[msg["code"]] = msg["id"]
        assert errors == {"too_many": f"n{LIMITS.max_concurrent_per_connection}", "duplicate_id": "n0"}
        for i in range(LIMITS.max_concurrent_per_connection):
            await ws.send(json.dumps({"type": "cancel", "id": f"n{i}"}))
        await collect(ws, {f"n{i}" for i in range(LIMITS.max_concurrent_per_connection)})
        await ws.send(start("ok", 3))  # still works
        _, ends = await collect(ws, {"ok"})
        assert ends["ok"]["type"] == "end"
        assert ends["ok"]["stats"]["frames"] == 3
    # a frame over the transport limit closes only that connection
    async with connect(ws_url(server), max_size=None) as ws:
        await ws.send("x" * (LIMITS.ws_max_size + 10))
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(10):
                await ws.recv()
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 1009
    assert free(srv_engine)


@pytest.mark.asyncio
async def test_auth(secured):
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.get(http_url(secured, "/health"))).status_code == 200
        assert (await http.get(http_url(secured, "/metrics"))).status_code == 401
        body = {"model": "misotts", "input": "Hi.", "voice": "0", "response_format": "pcm"}
        r = await http.post(http_url(secured, "/v1/audio/speech"), json=body, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        ok = await http.get(http_url(secured, "/metrics"), headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
    async with connect(ws_url(secured)) as ws:
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(10):
                await ws.recv()
        assert info.value.rcvd.code == 1008
    async with connect(ws_url(secured), additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        await ws.send(start("a", 2))
        _, ends = await collect(ws, {"a"})
        assert ends["a"]["type"] == "end"
    async with RemoteEngine(ws_url(secured), token=TOKEN) as remote:
        chunks = [c async for c in remote.stream(SynthesisRequest("Hi.", max_audio_ms=160, seed=1))]
        assert sum(c.frames for c in chunks) == 2


def test_refuses_public_host_without_a_strong_token():
    with pytest.raises(SystemExit, match="without a token"):
        check_bind("0.0.0.0", Tenants())
    with pytest.raises(SystemExit, match="shorter than 16"):
        check_bind("0.0.0.0", Tenants({"default": "short"}))
    check_bind("0.0.0.0", Tenants({"default": "x" * 16}))
    for loopback in ("127.0.0.1", "::1", "localhost"):
        check_bind(loopback, Tenants())
        check_bind(loopback, Tenants({"default": "t"}))


@pytest.mark.asyncio
async def test_openai_speech_pcm_and_wav(server, srv_engine):
    url = http_url(server, "/v1/audio/speech")
    async with httpx.AsyncClient(timeout=60) as http:
        body = {"model": "misotts", "input": "Hello there.", "voice": "alloy", "response_format": "pcm", "seed": 3}
        body["max_audio_ms"] = 80 * 6  # an extension; random tiny weights never say end-of-speech
        async with http.stream("POST", url, json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("audio/pcm")
            assert "content-length" not in r.headers  # chunked: audio flows while it is generated
            parts = [p async for p in r.aiter_bytes()]
        pcm = b"".join(parts)
        assert len(pcm) == 2 * 6 * FRAME_SAMPLES
        r = await http.post(url, json={**body, "response_format": "wav"})
        assert r.status_code == 200
        assert r.headers["content-type"] == "audio/wav"
        data = r.content
        assert data[:4] == b"RIFF"
        assert data[8:16] == b"WAVEfmt "
        assert data[36:40] == b"data"
        fmt, channels, rate, _, _, bits = struct.unpack("<HHIIHH", data[20:36])
        assert (fmt, channels, rate, bits) == (1, 1, 24_000, 16)
        assert data[44:] == pcm  # same seed, same audio
        bad = await http.post(url, json={**body, "response_format": "ogg"})
        assert bad.status_code == 400
        assert "pcm" in bad.json()["error"]["message"]
        assert (await http.post(url, json={"input": ""})).status_code == 400
        json_type = {"Content-Type": "application/json"}
        assert (await http.post(url, content=b"nope", headers=json_type)).status_code == 400
        assert (await http.post(url, content=json.dumps(body).encode())).status_code == 415  # no JSON type
        metrics = (await http.get(http_url(server, "/metrics"))).text
        health = (await http.get(http_url(server, "/health"))).json()
    for name in (
        "misotts_active_streams",
        "misotts_queue_depth",
        "misotts_time_to_first_audio_seconds_bucket",
        "misotts_real_time_factor_bucket",
        'misotts_requests_total{endpoint="openai",outcome="completed"}',
        "misotts_websocket_connections",
    ):
        assert name in metrics
    assert health["status"] == "ok"
    assert health["max_batch"] == 2
    assert free(srv_engine)


@pytest.mark.asyncio
async def test_remote_engine_matches_in_process(server, srv_engine):
    context = (Segment(1, "Why so slow?", tone(0.4, freq=300)),)
    request = SynthesisRequest("Sure, one moment.", context=context, seed=11, max_audio_ms=80 * 6)
    local = await asyncio.to_thread(srv_engine.synthesize, request)
    async with RemoteEngine(f"http://127.0.0.1:{server.port}") as remote:
        with remote.stream(request) as stream:
            chunks = [c async for c in stream]
        pcm = np.concatenate([c.pcm for c in chunks])
        assert [c.start_frame for c in chunks] == [0, 1, 3]
        assert chunks[-1].final
        np.testing.assert_array_equal(stream.codes, local.codes)
        np.testing.assert_allclose(pcm, np.clip(local.pcm, -1, 1), atol=2 / 32767)
        assert stream.stats.frames == 6
        assert stream.stats.seed == 11
        assert stream.stats.stop_reason == "max_frames"
        with pytest.raises(InvalidRequest):  # the server's refusal, as the engine's exception
            async for _ in remote.stream(SynthesisRequest("x" * 600)):
                pass
        # cancel from the client frees the slot on the server
        long = remote.stream(SynthesisRequest("Long one.", max_audio_ms=80 * 400, seed=2))
        await long.__anext__()
        long.cancel()
        assert await asyncio.to_thread(free, srv_engine)


async def remote_outcome(remote: RemoteEngine, text: str, seed: int, frames: int) -> str:
    """ "ok" when the request streamed all its audio, "busy" when the server turned it away."""
    stream = remote.stream(SynthesisRequest(text, seed=seed, max_audio_ms=80 * frames))
    try:
        samples = sum([c.pcm.size async for c in stream])
    except EngineBusy:
        return "busy"
    assert samples == frames * FRAME_SAMPLES
    assert stream.stats.frames == frames
    return "ok"


@pytest.mark.asyncio
async def test_load_many_remote_requests(server, srv_engine):
    n = 8
    outcomes: list[str] = []

    async def one(remote: RemoteEngine, i: int) -> None:
        outcomes.append(await remote_outcome(remote, f"Request number {i}.", i, 5))

    async with RemoteEngine(ws_url(server)) as remote:
        async with asyncio.timeout(60):
            await asyncio.gather(*(one(remote, i) for i in range(n)))
    assert len(outcomes) == n
    assert outcomes.count("ok") >= LIMITS.max_concurrent_per_connection  # the rest were told: too many
    assert free(srv_engine)
    # the server still answers after the burst
    async with RemoteEngine(ws_url(server)) as remote:
        chunks = [c async for c in remote.stream(SynthesisRequest("Again.", seed=1, max_audio_ms=160))]
    assert sum(c.frames for c in chunks) == 2


def test_audio_b64_is_int16_le():
    data = base64.b64decode(audio_to_b64(np.array([0.0, 1.0, -1.0], dtype=np.float32)))
    assert np.frombuffer(data, "<i2").tolist() == [0, 32767, -32767]


def contiguous(chunks: list[tuple]) -> bool:
    """Chunks (start_frame, frames, ...) follow each other with no gap or overlap from frame 0."""
    at = 0
    for start_frame, frames, *_ in chunks:
        if start_frame != at:
            return False
        at += frames
    return True


@pytest.mark.asyncio
async def test_incremental_text_is_spoken_sentence_by_sentence(server, srv_engine, engine_requests):
    frames = 3
    async with connect(ws_url(server)) as ws:
        first = {"type": "start", "id": "inc", "incremental": True, "text": "Hello there. How", "seed": 3}
        await ws.send(json.dumps(first | {"max_audio_ms": 80 * frames, "codes": True}))
        async with asyncio.timeout(20):  # the first sentence is spoken before the rest of the text exists
            data = await ws.recv()
        assert isinstance(data, bytes)
        assert unpack_audio(data)[:2] == ("inc", 0)
        head = unpack_audio(data)
        for piece in (" are you?", " Fine"):
            await ws.send(json.dumps({"type": "append", "id": "inc", "text": piece}))
        await ws.send(json.dumps({"type": "end", "id": "inc"}))
        audio, ends = await collect(ws, {"inc"})
        await ws.send(json.dumps({"type": "append", "id": "inc", "text": "late"}))  # the request is over
        assert (await next_json(ws))["code"] == "bad_message"
    chunks = [(head[1], head[2], head[3], bytes(head[4])), *audio["inc"]]
    end = ends["inc"]
    assert end["type"] == "end"
    assert end["stats"]["parts"] == 3
    assert end["stats"]["frames"] == 3 * frames
    assert len(end["codes"]) == 3 * frames
    assert contiguous(chunks)
    assert sum(len(c[3]) for c in chunks) == 2 * 3 * frames * FRAME_SAMPLES
    assert chunks[-1][2]
    assert not any(c[2] for c in chunks[:-1])  # final: only the end of the last part
    assert [r.text for r in engine_requests] == ["Hello there.", "How are you?", "Fine"]
    # Each part is conditioned on what was already spoken of the utterance (text and audio).
    assert engine_requests[0].context == ()
    spoken = [r.context[-1] for r in engine_requests[1:]]
    # the parts as far as their audio went (each was cut at its frame limit): words and audio agree
    heard = [said(t, frames) for t in ("Hello there.", "How are you?")]
    assert [seg.text for seg in spoken] == [heard[0], f"{heard[0]} {heard[1]}"]
    assert [seg.audio.size for seg in spoken] == [frames * FRAME_SAMPLES, 2 * frames * FRAME_SAMPLES]
    assert all(r.seed == 3 and r.max_frames == frames for r in engine_requests)
    assert free(srv_engine)


@pytest.mark.asyncio
async def test_incremental_flush_cancel_and_empty(server, srv_engine, engine_requests):
    async with connect(ws_url(server)) as ws:
        await ws.send(json.dumps({"type": "start", "id": "bad", "incremental": True, "topk": 0}))
        _, refused = await collect(ws, {"bad"})  # at once, not when a sentence is complete
        assert refused["bad"]["type"] == "error"
        assert refused["bad"]["code"] == "invalid_request"
        await ws.send(json.dumps({"type": "start", "id": "e", "incremental": True}))
        await ws.send(json.dumps({"type": "end", "id": "e"}))
        _, ends = await collect(ws, {"e"})
        assert ends["e"]["stats"] == {**ends["e"]["stats"], "frames": 0, "parts": 0, "stop_reason": "empty"}
        await ws.send(json.dumps({"type": "start", "id": "f", "incremental": True, "max_audio_ms": 80 * 400}))
        await ws.send(json.dumps({"type": "append", "id": "f", "text": "no sentence end yet", "flush": True}))
        async with asyncio.timeout(20):
            assert isinstance(await ws.recv(), bytes)  # flushed: spoken without an end of sentence
        await ws.send(json.dumps({"type": "cancel", "id": "f"}))
        _, ends = await collect(ws, {"f"})
        assert ends["f"]["stats"]["stop_reason"] == "cancelled"
        assert ends["f"]["stats"]["frames"] < 400
    assert [r.text for r in engine_requests] == ["no sentence end yet"]
    assert free(srv_engine)


@pytest.mark.asyncio
async def test_session_keeps_the_voice_and_the_turns(server, srv_engine, engine_requests):
    user_audio = tone(0.6, freq=250)
    voice = {"speaker": 0, "text": "This is my voice.", "audio_b64": audio_to_b64(tone(0.5, freq=180))}
    turn = {"text": "Where is my order?", "audio_b64": audio_to_b64(user_audio)}
    async with connect(ws_url(server)) as ws:
        await ws.send(json.dumps({"type": "session", "session": "c1", "op": "voice", "voice": voice}))
        assert await next_json(ws) == {"type": "session", "session": "c1", "op": "voice", "turns": 0, "voice": True}
        await ws.send(json.dumps({"type": "session", "session": "c1", "op": "user_turn", **turn}))
        assert (await next_json(ws))["turns"] == 1
        for rid in ("r1", "r2"):
            await ws.send(start(rid, 4, session="c1"))
            await collect(ws, {rid})
        # The user hears 0.4 s, then barges in: the session's clock says so, whatever the CPU's speed.
        now = [0.0]
        backend_of(server).sessions.get("default/c1").memory.clock = lambda: now[0]  # (scoped: tenant/name)
        long = "A long answer that the user will interrupt."
        await ws.send(start("cut", 400, session="c1", text=long))
        async with asyncio.timeout(20):
            frames = 0
            while frames < 10:  # 0.8 s generated and sent
                data = await ws.recv()
                frames += unpack_audio(data)[2] if isinstance(data, bytes) else 0
        now[0] = 0.4
        await ws.send(json.dumps({"type": "cancel", "id": "cut"}))
        await collect(ws, {"cut"})
        await ws.send(start("r4", 2, session="c1"))
        await collect(ws, {"r4"})
        await ws.send(start("solo", 2))  # no session: no memory
        await collect(ws, {"solo"})
        await ws.send(json.dumps({"type": "session", "session": "c1", "op": "close"}))
        assert (await next_json(ws))["closed"] is True
        for sid in ("c2", "c3"):  # c1 still counts: three sessions per connection
            await ws.send(json.dumps({"type": "session", "session": sid, "op": "clear"}))
            assert (await next_json(ws))["turns"] == 0
        await ws.send(start("x", 2, session="c4"))
        assert (await next_json(ws))["code"] == "too_many"
    r1, r2, cut, r4, solo = engine_requests
    assert r1.voice is not None
    assert r1.voice.text == "This is my voice."
    assert r2.voice == r1.voice
    assert [(s.speaker, s.text) for s in r1.context] == [(1, "Where is my order?")]
    assert r1.context[0].audio.size == user_audio.size
    assert [(s.speaker, s.text) for s in r2.context] == [(1, "Where is my order?"), (0, said("Hello from Miso.", 4))]
    assert r2.context[1].audio.size == 4 * FRAME_SAMPLES  # the agent's reply as generated
    # The interrupted reply is remembered as far as it was heard: cut audio, cut words.
    heard = r4.context[-1]
    assert heard.speaker == 0
    assert heard.audio.size == int(0.4 * 24_000)
    assert cut.text.startswith(heard.text)
    assert len(heard.text) < len(cut.text)
    assert solo.context == ()
    assert solo.voice is None
    assert free(srv_engine)


@pytest.mark.asyncio
async def test_named_voices_and_sessions_on_the_openai_endpoint(voiced, srv_engine, engine_requests):
    url = http_url(voiced, "/v1/audio/speech")
    body = {"model": "misotts", "input": "Hello.", "voice": "anna", "response_format": "pcm", "max_audio_ms": 160}
    async with httpx.AsyncClient(timeout=60) as http:
        ok = await http.post(url, json=body | {"session": "oa"})
        again = await http.post(url, json=body | {"session": "oa", "voice": "1"})
        unknown = await http.post(url, json=body | {"voice": "alloy"})
    assert ok.status_code == 200
    assert len(ok.content) == 2 * 2 * FRAME_SAMPLES
    assert again.status_code == 200
    assert unknown.status_code == 400
    assert "anna" in unknown.json()["error"]["message"]
    first, second = engine_requests
    assert first.voice == ANNA
    assert first.context == ()
    # The session remembers the first reply; the second asks for speaker 1 and keeps the session's
    # memory (the named voice belonged to the first request only).
    assert second.speaker == 1
    assert second.voice is None
    assert [(s.speaker, s.text) for s in second.context] == [(0, "Hello.")]
    async with connect(ws_url(voiced)) as ws:
        await ws.send(start("v", 2, voice="anna"))
        _, ends = await collect(ws, {"v"})
    assert ends["v"]["type"] == "end"
    assert engine_requests[-1].voice == ANNA
    assert free(srv_engine)


@pytest.mark.asyncio
async def test_many_clients_at_once_lose_nothing(server, srv_engine):
    """Eight connections (with incremental text, sessions and a client that vanishes) on a two-slot
    engine: every request either completes with all its audio or ends with an error it was told."""
    outcomes: list[str] = []

    async def client(i: int) -> None:
        async with RemoteEngine(ws_url(server)) as remote:
            for j in range(2):
                outcomes.append(await remote_outcome(remote, f"Client {i}, reply {j}.", i, 4))

    async def incremental(i: int) -> None:
        async with connect(ws_url(server)) as ws:
            msg = {"type": "start", "id": "t", "incremental": True, "session": f"s{i}", "max_audio_ms": 80 * 2}
            await ws.send(json.dumps(msg | {"text": "One. Two."}))
            await ws.send(json.dumps({"type": "end", "id": "t"}))
            audio, ends = await collect(ws, {"t"}, timeout=60)
        assert ends["t"]["stats"]["frames"] == 4
        assert sum(len(c[3]) for c in audio["t"]) == 2 * 4 * FRAME_SAMPLES
        outcomes.append("ok")

    async def vanishing() -> None:
        ws = await connect(ws_url(server))
        await ws.send(start("gone", 400))
        async with asyncio.timeout(30):
            await ws.recv()
        await ws.close()
        outcomes.append("gone")

    async with asyncio.timeout(120):
        await asyncio.gather(*(client(i) for i in range(5)), incremental(0), incremental(1), vanishing())
    # The engine queues (64 deep): below that nobody is turned away, and everybody got all their audio.
    assert sorted(outcomes) == ["gone"] + ["ok"] * 12
    assert await asyncio.to_thread(free, srv_engine)


@pytest.mark.asyncio
async def test_audio_is_sent_once_per_connection(server, srv_engine, engine_requests):
    user = tone(0.7, freq=230)
    item = {"speaker": 1, "text": "Hello?", "audio_id": "u1"}
    async with connect(ws_url(server)) as ws:
        await ws.send(start("a", 2, context=[item | {"audio_b64": audio_to_b64(user)}]))
        await ws.send(start("b", 2, context=[item]))  # the id alone: the server has the audio
        _, ends = await collect(ws, {"a", "b"})
        await ws.send(start("c", 2, context=[item | {"audio_id": "never-sent"}]))
        _, missing = await collect(ws, {"c"})
    assert ends["a"]["type"] == ends["b"]["type"] == "end"
    assert missing["c"]["code"] == "unknown_audio"
    a, b = engine_requests
    np.testing.assert_array_equal(a.context[0].audio, b.context[0].audio)
    np.testing.assert_allclose(a.context[0].audio, user, atol=1 / 32767)

    # RemoteEngine sends each audio once, and sends it again when the server no longer has it.
    context = (Segment(1, "Hello?", user),)
    async with RemoteEngine(ws_url(server)) as remote:
        await remote.connect()
        remote._known_audio.add(hashlib.sha1(to_int16(user)).hexdigest())  # as if evicted on the server
        sent: list[dict] = []
        real_send = remote._ws.send

        async def spy(text):
            sent.append(json.loads(text))
            await real_send(text)

        remote._ws.send = spy
        for seed in (1, 2):
            stream = remote.stream(SynthesisRequest("Yes?", context=context, seed=seed, max_audio_ms=160))
            assert sum([c.frames async for c in stream]) == 2
    # 1: by id (refused: unknown_audio), 2: the same start again with the audio, 3: the next, by id
    assert [("audio_b64" in m["context"][0]) for m in sent] == [False, True, False]
    assert sent[0]["id"] == sent[1]["id"] != sent[2]["id"]
    np.testing.assert_array_equal(engine_requests[-1].context[0].audio, a.context[0].audio)
    assert len(engine_requests) == 4
    assert free(srv_engine)


@pytest.mark.asyncio
async def test_an_engine_failure_mid_stream_reaches_the_client(server, srv_engine, monkeypatch):
    """A failed step (a CUDA out-of-memory is a RuntimeError) ends the request with an error message."""
    real = srv_engine.stream

    class Failing:
        def __init__(self, stream) -> None:
            self.stream, self.chunks = stream, 0

        def __getattr__(self, name):
            return getattr(self.stream, name)

        def __aiter__(self):
            return self

        async def __anext__(self):
            if self.chunks == 1:
                raise RuntimeError("CUDA error: out of memory")
            self.chunks += 1
            return await self.stream.__anext__()

    monkeypatch.setattr(srv_engine, "stream", lambda request, **options: Failing(real(request, **options)))
    async with connect(ws_url(server)) as ws:
        await ws.send(start("oom", 50))
        audio, ends = await collect(ws, {"oom"})
        assert len(audio["oom"]) == 1
        assert ends["oom"]["type"] == "error"
        assert "out of memory" in ends["oom"]["message"]
        monkeypatch.setattr(srv_engine, "stream", real)
        await ws.send(start("after", 2))  # the connection goes on
        _, ends = await collect(ws, {"after"})
        assert ends["after"]["type"] == "end"
    assert free(srv_engine)


@pytest.mark.asyncio
async def test_remote_engine_belongs_to_one_running_loop(server):
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, daemon=True)
    thread.start()
    remote = RemoteEngine(ws_url(server))
    try:
        asyncio.run_coroutine_threadsafe(remote.connect(), other).result(timeout=10)
        with pytest.raises(RuntimeError, match="one RemoteEngine"):
            async for _ in remote.stream(SynthesisRequest("Hi.", max_audio_ms=80)):
                pass
    finally:
        asyncio.run_coroutine_threadsafe(remote.aclose(), other).result(timeout=10)
        other.call_soon_threadsafe(other.stop)
        thread.join(timeout=10)
        other.close()


def test_remote_engine_blocking_use_matches_the_engine(server, srv_engine):
    """Outside any event loop: synthesize() and a plain for, like MisoEngine's, on the client's own loop."""
    request = SynthesisRequest("Blocking call.", seed=4, max_audio_ms=80 * 3)
    local = srv_engine.synthesize(request)
    with RemoteEngine(ws_url(server)) as remote:
        remote_whole = remote.synthesize(request)
        np.testing.assert_array_equal(remote_whole.codes, local.codes)
        assert remote_whole.pcm.size == 3 * FRAME_SAMPLES
        assert remote_whole.stats.frames == 3
        long = remote.stream(SynthesisRequest("Long one.", seed=2, max_audio_ms=80 * 400))
        for chunk in long:
            assert chunk.start_frame == 0
            break
        long.cancel()
        assert free(srv_engine)
        loop_thread = remote._blocking_loop
        assert loop_thread is not None
    assert remote.closed
    assert remote._blocking_loop is None
    assert wait_until(lambda: not loop_thread.is_running(), timeout=5)  # the client's loop thread ended


def test_end_codes_have_the_models_codebooks():
    """An end message's codes as an array: (frames, K); none (an utterance that ended before its first
    frame) is (0, 32), not a reshape error in the client's reader."""
    assert protocol.codes_array([]).shape == protocol.codes_array(None).shape == (0, NUM_CODEBOOKS) == (0, 32)
    rows = [[1] * NUM_CODEBOOKS, [2] * NUM_CODEBOOKS]
    np.testing.assert_array_equal(protocol.codes_array(rows), np.array(rows))


def test_the_client_loads_no_model_code():
    """url= mode loads nothing: the client and what it builds requests from import neither torch nor moshi."""
    code = (
        "import sys\n"
        "from misotts_agents.server import RemoteEngine\n"
        "from misotts_agents.engine.request import Segment, SynthesisRequest\n"
        "from misotts_agents.engine.voice import VoicePrompt\n"
        "print(sorted(m for m in ('torch', 'moshi', 'silentcipher') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.asyncio
async def test_the_official_openai_client_works_unchanged(secured, srv_engine):
    """The `openai` package's own speech call, streamed, against the server (its api_key is our token)."""
    from openai import AsyncOpenAI, AuthenticationError

    client = AsyncOpenAI(base_url=http_url(secured, "/v1"), api_key=TOKEN, max_retries=0)
    async with client.audio.speech.with_streaming_response.create(
        model="misotts",
        voice="alloy",
        input="Hello from the OpenAI client.",
        response_format="pcm",
        extra_body={"max_audio_ms": 80 * 3, "seed": 1},
    ) as response:
        assert response.headers["content-type"].startswith("audio/pcm")
        pcm = b"".join([part async for part in response.iter_bytes()])
    assert len(pcm) == 2 * 3 * FRAME_SAMPLES
    wav = await client.audio.speech.create(
        model="misotts", voice="alloy", input="Again.", response_format="wav", extra_body={"max_audio_ms": 160}
    )
    assert wav.content[:4] == b"RIFF"
    assert len(wav.content) == 44 + 2 * 2 * FRAME_SAMPLES
    wrong = AsyncOpenAI(base_url=http_url(secured, "/v1"), api_key="nope", max_retries=0)
    with pytest.raises(AuthenticationError):
        await wrong.audio.speech.create(model="misotts", voice="alloy", input="Hi.", response_format="pcm")
    await client.close()
    await wrong.close()
    assert free(srv_engine)

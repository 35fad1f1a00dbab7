"""The server facing the world: tenants, browser origins, and every limit (what a client sees at each).

All traffic is on 127.0.0.1. Limits are set small so that each is reached in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time

import httpx
import numpy as np
import pytest
from engines import load_tiny
from remote_server import LoopbackServer
from server_client import collect, free, http_url, next_json, silent_client, start, ws_url
from signals import tone, wait_until
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from misotts_agents.audio import FRAME_SAMPLES, SAMPLE_RATE
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.server import Limits, schema
from misotts_agents.server.budget import MemoryBudget
from misotts_agents.server.protocol import audio_to_b64
from misotts_agents.server.schema import validated
from misotts_agents.server.sessions import SESSION_OVERHEAD_BYTES, Session
from misotts_agents.server.tenants import Tenants, parse_tokens

ACME, BOB = "acme-token-0123456789", "bob-token-0123456789"
TENANTS = Tenants({"acme": ACME, "bob": BOB})
LIMITS = Limits(
    max_text_chars=500,
    max_message_bytes=300_000,
    ws_max_size=400_000,
    max_connections=6,
    max_connections_per_tenant=4,
    max_streams_per_tenant=3,
    max_sessions_per_tenant=4,
    max_memory_bytes=2_000_000,
    max_cached_audio_bytes=1_000_000,
    send_buffer_bytes=64_000,
    socket_send_buffer_bytes=16_384,
    send_timeout_s=1.0,
    header_timeout_s=1.0,
    body_timeout_s=1.0,
    ws_idle_timeout_s=2.0,
)
ANNA = VoicePrompt(0, "I am Anna.", tone(0.3, freq=190))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def lim_engine(tiny_dir):
    with load_tiny(tiny_dir, max_batch=2) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(lim_engine):
    voices = {"anna": ANNA, "acme/anna": VoicePrompt(0, "Acme's Anna.", tone(0.3, freq=210))}
    with LoopbackServer(
        lim_engine, token=None, tenants=TENANTS, limits=LIMITS, voices=voices, allow_origins=["https://app.example"]
    ) as s:
        yield s


def backend(s):
    return s.app.state.backend


# -- tenants ------------------------------------------------------------------------------------------


def test_tokens_name_tenants():
    assert parse_tokens("# ops\nacme: tok-a\n\nbob:tok-b\n", "f") == {"acme": "tok-a", "bob": "tok-b"}
    assert parse_tokens("just-one-token\n", "f") == {"default": "just-one-token"}
    with pytest.raises(ValueError, match="name:token"):
        parse_tokens("a:x\nbroken\n", "f")
    with pytest.raises(ValueError, match="same token"):
        Tenants({"a": "same", "b": "same"})
    env = {"MISOTTS_TOKENS": "acme:tok-a,bob:tok-b", "MISOTTS_TOKEN": "ignored"}
    assert Tenants.load(env=env).names == ["acme", "bob"]
    assert Tenants.load(env={"MISOTTS_TOKEN": "t0"}).authenticate("Bearer t0") == "default"
    assert Tenants.load(env={}).open
    assert TENANTS.authenticate(f"Bearer {BOB}") == "bob"
    assert TENANTS.authenticate(f"bearer {ACME}") == "acme"
    assert TENANTS.authenticate("Bearer nope") is None
    assert TENANTS.authenticate(None) is None
    assert TENANTS.authenticate(f"Basic {ACME}") is None


@pytest.mark.asyncio
async def test_sessions_audio_and_voices_belong_to_one_tenant(server, lim_engine):
    user = {"text": "Where is it?", "audio_b64": audio_to_b64(tone(0.4, freq=250))}
    async with (
        connect(ws_url(server), additional_headers=auth(ACME)) as a,
        connect(ws_url(server), additional_headers=auth(BOB)) as b,
    ):
        await a.send(json.dumps({"type": "session", "session": "conv", "op": "user_turn", **user}))
        assert (await next_json(a))["turns"] == 1
        await b.send(json.dumps({"type": "session", "session": "conv", "op": "clear"}))  # bob's own "conv"
        assert (await next_json(b))["turns"] == 0
        await a.send(json.dumps({"type": "session", "session": "conv", "op": "voice", "voice": "anna"}))
        assert (await next_json(a))["turns"] == 1  # bob's clear did not touch acme's session
        item = {"speaker": 1, "text": "Hm.", "audio_id": "clip"}
        await a.send(start("x", 2, context=[item | {"audio_b64": audio_to_b64(tone(0.3))}]))
        _, ends = await collect(a, {"x"})
        assert ends["x"]["type"] == "end"
        await b.send(start("y", 2, context=[item]))  # acme's audio id means nothing to bob
        _, ends = await collect(b, {"y"})
        assert ends["y"]["code"] == "unknown_audio"
        await b.send(start("z", 2, voice="acme/anna"))  # another tenant's voice is out of reach
        _, ends = await collect(b, {"z"})
        assert ends["z"]["code"] == "invalid_request"
    store = backend(server).sessions
    assert "acme/conv" in store
    assert "bob/conv" in store
    assert store.get("acme/conv").voice.text == "Acme's Anna."  # acme's own anna before the shared one
    assert len(store.get("acme/conv").memory.context()) == 1
    assert not store.get("bob/conv").memory.context()
    assert free(lim_engine)


@pytest.mark.asyncio
async def test_one_tenant_flooding_sessions_cannot_evict_another_tenants(server):
    voice = {"speaker": 0, "text": "My own voice.", "audio_b64": audio_to_b64(tone(1.0, freq=170))}
    async with connect(ws_url(server), additional_headers=auth(BOB)) as b:
        await b.send(json.dumps({"type": "session", "session": "victim", "op": "voice", "voice": voice}))
        assert (await next_json(b))["voice"] is True
    big = {"text": "Flood.", "audio_b64": audio_to_b64(tone(4.0))}  # 384 kB kept per session
    for round_ in range(3):
        async with connect(ws_url(server), additional_headers=auth(ACME)) as a:
            for i in range(4):
                msg = {"type": "session", "session": f"flood{round_}-{i}", "op": "user_turn", **big}
                await a.send(json.dumps(msg))
                assert (await next_json(a))["type"] == "session"
                # and audio kept by id, up to acme's share of cached audio
                ctx = [{"speaker": 1, "text": "x", "audio_id": f"a{round_}-{i}", "audio_b64": big["audio_b64"]}]
                await a.send(start(f"r{i}", 1, context=ctx, max_audio_ms=80))
                await collect(a, {f"r{i}"})
    budget = server.app.state.budget
    assert "bob/victim" in backend(server).sessions  # the cloned voice survived the flood
    assert budget.used_bytes <= LIMITS.max_memory_bytes
    assert budget.evicted > 0  # the budget was reached
    assert budget.sessions <= 4 + 2  # acme's count limit held; bob's remain


def test_the_budget_evicts_from_the_largest_tenant_audio_first():
    budget = MemoryBudget(100_000, max_sessions=10, session_ttl_s=60)

    class Blob:
        def __init__(self, n):
            self.nbytes = n

    budget.get_session("small", "keep", lambda: Blob(20_000))
    budget.keep_audio("big", "a1", "x" * 30_000)
    budget.get_session("big", "s1", lambda: Blob(30_000))
    budget.get_session("big", "s2", lambda: Blob(30_000))  # over: big's audio goes first
    assert budget.has_session("small", "keep")
    assert budget.used_bytes <= 100_000
    with pytest.raises(Exception, match="send it again"):
        budget.audio("big", "a1")
    budget.get_session("big", "s3", lambda: Blob(30_000))  # over again: big's oldest session goes
    assert not budget.has_session("big", "s1")
    assert budget.has_session("big", "s3")
    assert budget.has_session("small", "keep")


def test_session_turn_audio_is_an_owned_copy_at_the_cap(lim_engine):
    """A 60 s user turn keeps 20 s of its own, not a view pinning the whole decoded clip."""
    from misotts_agents.server.sessions import EngineBackend

    backend = EngineBackend(lim_engine, LIMITS)
    store = backend.sessions
    data = {"type": "session", "session": "default/long", "op": "user_turn", "text": "Long.", "speaker": 1}
    turn = validated(schema.Session, data | {"audio_b64": audio_to_b64(tone(60.0))}, LIMITS)
    asyncio.run(backend.session(turn))
    (segment,) = store.get("default/long").memory.context()
    cap = int(store.get("default/long").memory.max_turn_s * SAMPLE_RATE)
    owner = segment.audio if segment.audio.base is None else segment.audio.base
    assert segment.audio.size == cap
    assert owner.nbytes == cap * 4  # holds exactly its samples, no more
    session = store.get("default/long")
    assert session.nbytes == SESSION_OVERHEAD_BYTES + cap * 4
    assert isinstance(session, Session)


# -- browser safety ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_foreign_origin_is_refused_and_there_is_no_cors_by_default(server, lim_engine):
    with pytest.raises(InvalidStatus) as info:
        await connect(ws_url(server), additional_headers=auth(ACME) | {"Origin": "https://evil.example"})
    assert info.value.response.status_code == 403
    async with connect(ws_url(server), additional_headers=auth(ACME) | {"Origin": "https://app.example"}) as ws:
        await ws.send(start("ok", 2))
        _, ends = await collect(ws, {"ok"})
        assert ends["ok"]["type"] == "end"
    url = http_url(server, "/v1/audio/speech")
    body = {"input": "Hi.", "response_format": "pcm", "max_audio_ms": 160}
    async with httpx.AsyncClient(timeout=30) as http:
        plain = await http.post(url, content=json.dumps(body), headers=auth(ACME) | {"Content-Type": "text/plain"})
        assert plain.status_code == 415
        assert plain.json()["error"]["type"] == "invalid_request_error"
        evil = await http.post(url, json=body, headers=auth(ACME) | {"Origin": "https://evil.example"})
        assert evil.status_code == 403
        assert "access-control-allow-origin" not in evil.headers
        ok = await http.post(url, json=body, headers=auth(ACME) | {"Origin": "https://app.example"})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://app.example"
        assert len(ok.content) == 2 * 2 * FRAME_SAMPLES
    assert free(lim_engine)


def test_cors_is_off_without_allowed_origins(lim_engine):
    with LoopbackServer(lim_engine, token=None, limits=LIMITS) as s:
        r = httpx.options(
            http_url(s, "/v1/audio/speech"),
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in r.headers
        health = httpx.get(http_url(s, "/health")).json()
    assert health["model"] == "tiny"
    assert "/" not in json.dumps(health)


# -- limits: what a client sees --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_connection_and_stream_limits(server, lim_engine):
    async with contextlib_stack() as stack:
        conns = [
            await stack.enter_async_context(connect(ws_url(server), additional_headers=auth(ACME))) for _ in range(4)
        ]
        extra = await stack.enter_async_context(connect(ws_url(server), additional_headers=auth(ACME)))
        with pytest.raises(ConnectionClosed) as info:  # acme's fifth: the tenant's limit
            async with asyncio.timeout(10):
                await extra.recv()
        assert info.value.rcvd.code == 1013
        assert "per tenant" in info.value.rcvd.reason
        b = await stack.enter_async_context(connect(ws_url(server), additional_headers=auth(BOB)))
        for i in range(3):
            await conns[0].send(start(f"s{i}", 60))
        await conns[0].send(json.dumps({"type": "ping"}))
        await next_json(conns[0])  # (messages of a connection are handled in order: the three started)
        await conns[1].send(start("s3", 60))  # acme's fourth concurrent stream
        _, ends = await collect(conns[1], {"s3"})
        assert ends["s3"]["code"] == "too_many"
        assert ends["s3"]["retryable"] is True
        await b.send(start("b", 2))  # bob is not held back by acme's streams
        _, ends = await collect(b, {"b"}, timeout=60)
        assert ends["b"]["type"] == "end"
        for i in range(3):
            await conns[0].send(json.dumps({"type": "cancel", "id": f"s{i}"}))
        await collect(conns[0], {"s0", "s1", "s2"})
    assert await asyncio.to_thread(free, lim_engine)
    assert wait_until(lambda: server.app.state.quotas.connections == 0, timeout=10)


def contextlib_stack():
    import contextlib

    return contextlib.AsyncExitStack()


@pytest.mark.asyncio
async def test_a_client_that_does_not_read_is_cut_off_and_its_slot_freed(server, lim_engine):
    # A raw socket that sends a start and never reads: the server's queue for it fills, then it is cut off.
    sock = silent_client(
        server.port, ACME, start("hog", 1500, chunks={"first_frames": 1, "growth": 1.0, "max_frames": 1})
    )
    try:
        assert wait_until(lambda: lim_engine.free_slots < lim_engine.max_batch, timeout=20)
        started = time.monotonic()
        assert await asyncio.to_thread(free, lim_engine)  # cut off: its request cancelled, the slot free
        assert time.monotonic() - started < 15
        async with connect(ws_url(server), additional_headers=auth(BOB)) as reader:
            await reader.send(start("fine", 3))  # the others are served as usual
            _, ends = await collect(reader, {"fine"}, timeout=60)
        assert ends["fine"]["type"] == "end"
        assert wait_until(lambda: not server.app.state.lifecycle.connections, timeout=10)  # dropped, not parked
    finally:
        sock.close()


def test_http_body_limits_and_deadlines(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(  # a declared 10 MB body, none of it sent: refused from the header alone
            f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ACME}\r\n"
            "Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(  # chunked, no length said: refused once over 300 kB, not after 1 MB
            f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ACME}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        try:
            for _ in range(100):
                sock.sendall(b"2710\r\n" + b" " * 10_000 + b"\r\n")  # 10 kB chunks
        except OSError:  # the server answered and closed while more was coming
            pass
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 413")
        assert b"too_large" in answer

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(  # a 20-byte body of which 10 come, then nothing: the body deadline is 1 s
            f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ACME}\r\n"
            'Content-Type: application/json\r\nContent-Length: 20\r\n\r\n{"input": '.encode()
        )
        started = time.monotonic()
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < 5


def test_slowloris_headers_are_cut_off(server):
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(10)
    started = time.monotonic()
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        for _ in range(8):  # a header line every 0.3 s, never the blank line that ends them
            sock.sendall(b"X-Slow: 1\r\n")
            time.sleep(0.3)
        remains = sock.recv(1024)
    except (ConnectionResetError, BrokenPipeError):
        remains = b""
    finally:
        sock.close()
    assert remains == b""
    assert time.monotonic() - started < 5  # closed at the 1 s header deadline


@pytest.mark.asyncio
async def test_an_idle_connection_is_closed_but_not_one_with_running_requests(server, lim_engine):
    async with connect(ws_url(server), additional_headers=auth(BOB)) as ws:
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(10):
                await ws.recv()
        assert info.value.rcvd.code == 1001
        assert info.value.rcvd.reason == "idle"
    async with connect(ws_url(server), additional_headers=auth(BOB)) as ws:
        # paced at real time: runs past the 2 s idle timeout while the client says nothing
        await ws.send(start("paced", 40, max_ahead_s=0.2))
        audio, ends = await collect(ws, {"paced"}, timeout=60)
        assert ends["paced"]["type"] == "end"
        assert sum(c[1] for c in audio["paced"]) == 40
    assert free(lim_engine)


@pytest.mark.asyncio
async def test_over_limit_values_get_their_own_answers(server):
    async with connect(ws_url(server), additional_headers=auth(ACME)) as ws:
        await ws.send(json.dumps({"type": "start", "id": "t", "text": "x" * 501}))
        err = await next_json(ws)
        assert err["code"] == "too_large"
        assert "'text'" in err["message"]
        ctx = [{"speaker": 1, "text": "a", "audio_b64": "AAAA"}] * 17
        await ws.send(json.dumps({"type": "start", "id": "t", "text": "hi", "context": ctx}))
        assert (await next_json(ws))["code"] == "too_large"
        for i in range(17):  # sessions per connection: 16
            await ws.send(json.dumps({"type": "session", "session": f"c{i}", "op": "clear"}))
        replies = [await next_json(ws) for _ in range(17)]
        assert [r.get("code") for r in replies].count("too_many") == 1


def test_named_voices_for_one_tenant_need_that_tenant(tmp_path, monkeypatch):
    from misotts_agents.audio import write_wav
    from misotts_agents.tools.cli import main

    monkeypatch.delenv("MISOTTS_TOKEN", raising=False)
    monkeypatch.delenv("MISOTTS_TOKENS", raising=False)
    write_wav(tmp_path / "v.wav", np.zeros(2400, np.float32))
    (tmp_path / "v.txt").write_text("Hi.")
    with pytest.raises(SystemExit, match="no tenant 'nobody'"):
        main(["serve", "--model", str(tmp_path), "--voice", f"nobody/anna={tmp_path / 'v.wav'}"])


@pytest.mark.asyncio
async def test_a_flooding_connection_gets_too_many_then_1008_and_others_serve_on(lim_engine):
    limits = dataclasses.replace(LIMITS, max_messages_per_s=5.0, message_burst=8)
    with LoopbackServer(lim_engine, token=None, tenants=TENANTS, limits=limits) as s:
        async with (
            connect(ws_url(s), additional_headers=auth(BOB)) as calm,
            connect(ws_url(s), additional_headers=auth(ACME)) as flood,
        ):
            await calm.send(start("c", 2))  # a request running on another connection through the flood
            replies: list[dict] = []
            with pytest.raises(ConnectionClosed) as info:
                await pings_then_replies(flood, 40, replies)  # pings count: a flood of cheap messages is one
            assert info.value.rcvd is not None
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, "message rate")
            pongs = [r for r in replies if r["type"] == "pong"]
            assert 8 <= len(pongs) <= 12  # the burst, and what refilled while it was sent
            assert replies[-1]["type"] == "error"
            assert replies[-1]["code"] == "too_many"
            _, ends = await collect(calm, {"c"}, timeout=60)
            assert ends["c"]["type"] == "end"
            for _ in range(3):  # a client within the rate is never limited
                await calm.send(json.dumps({"type": "ping"}))
                assert (await next_json(calm))["type"] == "pong"
                await asyncio.sleep(0.25)


async def pings_then_replies(ws, count: int, replies: list[dict]) -> None:
    """Send ``count`` pings as fast as possible, then read replies into ``replies`` until the close."""
    async with asyncio.timeout(10):
        for _ in range(count):
            try:
                await ws.send(json.dumps({"type": "ping"}))
            except ConnectionClosed:  # closed while sending: what came before the close is still read
                break
        while True:
            replies.append(json.loads(await ws.recv()))


def test_token_bucket_refills_at_its_rate():
    from misotts_agents.server.rate import TokenBucket

    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] = 0.5  # one token back
    assert [bucket.take(), bucket.take()] == [True, False]
    now[0] = 100.0  # never more than the burst
    assert sum(bucket.take() for _ in range(10)) == 3
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate=0, burst=1)


def test_the_client_tells_a_rate_limit_close_from_a_refused_token():
    from websockets.exceptions import ConnectionClosedError
    from websockets.frames import Close

    from misotts_agents.errors import EngineBusy, RemoteError, error_code
    from misotts_agents.server.client import RemoteEngine

    client = RemoteEngine("ws://127.0.0.1:9")
    rate = client._closed_error(ConnectionClosedError(Close(1008, "message rate"), None))
    assert isinstance(rate, EngineBusy)
    assert error_code(rate) == "too_many"
    refused = client._closed_error(ConnectionClosedError(Close(1008, "missing or wrong bearer token"), None))
    assert isinstance(refused, RemoteError)
    assert error_code(refused) == "unauthorized"


@pytest.mark.asyncio
async def test_invalid_utf8_text_is_one_warning_line_and_the_server_serves_on(server, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="uvicorn.error")
    async with connect(ws_url(server), additional_headers=auth(BOB)) as ws:
        await ws.send(b"\xff\xfe not utf-8", text=True)
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(10):
                await ws.recv()
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1007
    lines = [r for r in caplog.records if "UTF-8" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    assert lines[0].exc_info is None
    assert "closed it (1007)" in lines[0].getMessage()
    async with connect(ws_url(server), additional_headers=auth(BOB)) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        assert (await next_json(ws))["type"] == "pong"

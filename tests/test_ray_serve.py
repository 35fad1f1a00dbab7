"""Ray Serve: two CPU replicas of the tiny engine behind the ingress, on a local Ray cluster, driven
over real WebSocket and HTTP through Serve's proxy (misotts_agents/server/ray/serve.py).

One module-scoped cluster (about a minute on a 2-core machine, most of it Ray and the replicas
starting) serves every test here.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

import pytest

# Before Ray is imported (it reads these at import time) and inherited by the processes it starts:
# every Ray socket on loopback (the node address is 127.0.0.1, not the machine's interface), no
# `uv run` runtime environment (Ray would package the working tree for each worker), no usage stats.
for _key, _value in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_key, _value)

ray = pytest.importorskip("ray")

import httpx  # noqa: E402
from ray import serve  # noqa: E402
from signals import tone, wait_until  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from misotts_agents.audio import FRAME_SAMPLES  # noqa: E402
from misotts_agents.engine.request import SynthesisRequest  # noqa: E402
from misotts_agents.server import RemoteEngine  # noqa: E402
from misotts_agents.server.protocol import audio_to_b64, unpack_audio  # noqa: E402
from misotts_agents.server.ray.serve import (  # noqa: E402
    APP_NAME,
    ENGINE_DEPLOYMENT,
    INGRESS_DEPLOYMENT,
    RayServeArgs,
    app_builder,
    build_app,
)
from misotts_agents.server.tenants import DEFAULT_TENANT, scope  # noqa: E402

MAX_BATCH = 2
REPLICAS = 2
EXAMPLE_CONFIG = Path(__file__).parent.parent / "examples" / "ray_serve_config.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_example_config_is_a_serve_config_for_this_app():
    """examples/ray_serve_config.yaml passes Serve's schema, names this module's deployments, and its
    args build the application (no cluster needed)."""
    import yaml
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    (app,) = ServeDeploySchema.model_validate(config).applications
    assert app.import_path == "misotts_agents.server.ray.serve:app_builder"
    assert {d.name for d in app.deployments} == {ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT}
    engine = next(d for d in app.deployments if d.name == ENGINE_DEPLOYMENT)
    assert engine.max_ongoing_requests == app.args["max_batch"] + app.args["max_queue"]
    assert engine.ray_actor_options.num_gpus == 1
    assert engine.autoscaling_config["max_replicas"] >= 1
    # Serve never scales a deployment whose target is above what a replica may hold.
    assert engine.autoscaling_config["target_ongoing_requests"] < engine.max_ongoing_requests
    assert isinstance(app_builder(app.args), Application)
    # `serve run ...:app_builder key=value` passes strings.
    args = RayServeArgs.model_validate({"voices": "anna=a.wav, ben=b.wav", "watermark": "false", "max_batch": "4"})
    assert args.voices == ["anna=a.wav", "ben=b.wav"]
    assert args.watermark is False
    assert args.max_batch == 4
    with pytest.raises(ValueError, match=r"max_bach\s+Extra inputs are not permitted"):  # a typo is refused
        RayServeArgs.model_validate({"max_bach": 4})
    # the engine's prefill budget, checked by the engine's own parser
    assert RayServeArgs().prefill_chunk == "auto"
    assert RayServeArgs.model_validate({"prefill_chunk": "512"}).prefill_chunk == 512
    with pytest.raises(ValueError, match="prefill_chunk must be"):
        RayServeArgs.model_validate({"prefill_chunk": -3})


@pytest.fixture(scope="module")
def ray_app(tiny_dir):
    """The port of Serve's HTTP proxy, serving two engine replicas (no GPU) and the ingress."""
    timings = {}
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    timings["ray.init"] = time.perf_counter() - t0
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {
            "model": str(tiny_dir),
            "num_gpus": 0,
            "num_cpus": 1,
            "num_replicas": REPLICAS,
            "max_batch": MAX_BATCH,
            "max_queue": 4,
            "watermark": False,
            "torch_threads": 1,
            "max_sessions": 16,
        }
        t1 = time.perf_counter()
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        timings["serve.run"] = time.perf_counter() - t1
        print(f"\nRay Serve up: {', '.join(f'{k} {v:.1f} s' for k, v in timings.items())}")
        yield port
    finally:
        t2 = time.perf_counter()
        serve.shutdown()
        ray.shutdown()
        print(f"\nRay down in {time.perf_counter() - t2:.1f} s")


def engine_stats(sid: str | None = None) -> dict:
    """A replica's figures: the one holding session ``sid`` (Serve routes by it, as the server
    passes it on: scoped to the client's tenant, here the open server's ``default``), else any."""
    handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=APP_NAME)
    routed = handle.options(multiplexed_model_id=scope(DEFAULT_TENANT, sid) if sid else "")
    return routed.stats.remote([sid] if sid else []).result(timeout_s=30)


async def next_json(ws, timeout: float = 30.0) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            data = await ws.recv()
            if isinstance(data, str):
                return json.loads(data)


async def speak(ws, rid: str, frames: int, **fields) -> tuple[int, dict]:
    """One start; returns (PCM samples received, the end or error message)."""
    msg = {"type": "start", "id": rid, "text": "Hello from Miso.", "seed": 3, "max_audio_ms": 80 * frames} | fields
    await ws.send(json.dumps(msg))
    samples = 0
    async with asyncio.timeout(60):
        while True:
            data = await ws.recv()
            if isinstance(data, bytes):
                got, _, n, _, pcm = unpack_audio(data)
                assert got == rid
                assert len(pcm) == 2 * n * FRAME_SAMPLES
                samples += n * FRAME_SAMPLES
                continue
            end = json.loads(data)
            if end.get("id") == rid and end["type"] in ("end", "error"):
                return samples, end


async def session_op(ws, sid: str, op: str, **fields) -> dict:
    await ws.send(json.dumps({"type": "session", "session": sid, "op": op, **fields}))
    reply = await next_json(ws)
    assert reply["type"] == "session", reply
    return reply


@pytest.mark.asyncio
async def test_concurrent_conversations_stay_on_their_replica(ray_app):
    """Four conversations at once, each: user turn, reply, user turn, reply. Every reply is whole, and
    each conversation's calls all run on one replica: its session memory holds the replies (the
    turn counts), every session reply names the same replica, and Serve agrees. Both replicas work."""
    turn = {"text": "Where is my order?", "audio_b64": audio_to_b64(tone(0.4, freq=210))}

    async def conversation(i: int) -> tuple[str, set[str]]:
        sid = f"conv-{i}"
        replicas = set()
        async with connect(f"ws://127.0.0.1:{ray_app}/v1/stream", max_size=None) as ws:
            reply = await session_op(ws, sid, "user_turn", **turn)
            assert reply["turns"] == 1
            replicas.add(reply["replica"])
            for round_ in range(2):
                frames = 4 + i % 3
                samples, end = await speak(ws, f"{sid}-r{round_}", frames, session=sid, seed=i)
                assert end["type"] == "end", end
                assert end["stats"]["frames"] == frames
                assert samples == frames * FRAME_SAMPLES
                replicas.add(end["stats"].get("replica", next(iter(replicas))))
                # The reply became the session's agent turn on the same replica: 1 -> 3 -> 4 turns.
                op = session_op(ws, sid, "user_turn", **turn) if round_ == 0 else session_op(ws, sid, "voice")
                reply = await op
                assert reply["turns"] == (3 if round_ == 0 else 4), (sid, reply)
                replicas.add(reply["replica"])
        return sid, replicas

    results = await asyncio.gather(*(conversation(i) for i in range(4)))
    homes = {}
    for sid, replicas in results:
        assert len(replicas) == 1, f"{sid} ran on {replicas}"
        homes[sid] = replicas.pop()
    assert len(set(homes.values())) == REPLICAS, homes  # new sessions go to the replica with fewer
    for sid, home in homes.items():  # Serve's own routing finds each session where it lives
        stats = await asyncio.to_thread(engine_stats, sid)
        assert stats["replica"] == home
        assert stats["holds"] == [sid]


@pytest.mark.asyncio
async def test_requests_without_session_over_both_endpoints(ray_app):
    """More requests than the two replicas generate at once, without sessions, through RemoteEngine
    and the OpenAI endpoint: each completes with all its audio."""
    url = f"ws://127.0.0.1:{ray_app}"
    async with RemoteEngine(url) as remote:

        async def one(i: int) -> int:
            frames = 3 + i % 3
            stream = remote.stream(SynthesisRequest(f"Request {i}.", seed=i, max_audio_ms=80 * frames))
            pcm = [c.pcm async for c in stream]
            assert stream.stats.frames == frames
            assert stream.stats.stop_reason == "max_frames"
            return sum(p.size for p in pcm) - frames * FRAME_SAMPLES

        assert await asyncio.gather(*(one(i) for i in range(8))) == [0] * 8
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ray_app}", timeout=60) as http:
        body = {"model": "misotts", "input": "Hi there.", "response_format": "pcm", "max_audio_ms": 80 * 3}
        got = await http.post("/v1/audio/speech", json=body)
        assert got.status_code == 200
        assert len(got.content) == 3 * FRAME_SAMPLES * 2
        health = (await http.get("/health")).json()
        assert health["status"] == "ok"
        assert health["max_batch"] in (MAX_BATCH, REPLICAS * MAX_BATCH)
        bad = await http.post("/v1/audio/speech", json=body | {"input": ""})
        assert bad.status_code == 400
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        assert "misotts_engine_free_slots" in metrics.text


@pytest.mark.asyncio
async def test_admission_is_forwarded_from_the_replica(ray_app):
    """Asked for ``queue``, a request through the ingress is ``queued`` until its replica's engine gives
    it a slot, then ``admitted``, before its audio; the remote stream's ``wait_admitted`` follows."""
    async with connect(f"ws://127.0.0.1:{ray_app}/v1/stream", max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "id": "q", "text": "Hello.", "max_audio_ms": 160, "queue": True}))
        kinds: list[str] = []
        async with asyncio.timeout(60):
            while kinds[-1:] not in (["end"], ["error"]):
                data = await ws.recv()
                kinds.append("audio" if isinstance(data, bytes) else json.loads(data)["type"])
    assert kinds[:3] == ["queued", "admitted", "audio"]
    assert kinds[-1] == "end"
    async with RemoteEngine(f"ws://127.0.0.1:{ray_app}") as remote:
        stream = remote.stream(SynthesisRequest("Hello.", max_audio_ms=160))
        admission = asyncio.ensure_future(stream.wait_admitted())
        assert [c async for c in stream]
        assert await admission is True


def replica_of(sid: str) -> dict:
    """The figures of the replica holding ``sid``, once it has reported the session to Serve (this
    test's handle is another caller than the ingress: it learns where a session lives from Serve,
    a fraction of a second after the session started)."""
    assert wait_until(lambda: engine_stats(sid)["holds"] == [sid], 10), f"no replica reports {sid}"
    return engine_stats(sid)


def slots_freed(sid: str) -> bool:
    def freed() -> bool:
        stats = engine_stats(sid)
        return stats["holds"] == [sid] and stats["free_slots"] == MAX_BATCH and stats["engine"]["active"] == 0

    return wait_until(freed, 10)


@pytest.mark.asyncio
async def test_cancel_and_disconnect_free_the_replica_slot(ray_app):
    """A cancelled reply and one whose client vanished stop on their replica at once."""
    one_frame = {"first_frames": 1, "growth": 1.0, "max_frames": 1}
    long = {"max_ahead_s": 0.3, "chunks": one_frame}  # paced like playback: still running when cut
    async with connect(f"ws://127.0.0.1:{ray_app}/v1/stream", max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "id": "c", "text": "A long answer.", "session": "cut", **long}))
        async with asyncio.timeout(30):
            assert isinstance(await ws.recv(), bytes)
        assert (await asyncio.to_thread(replica_of, "cut"))["free_slots"] < MAX_BATCH
        await ws.send(json.dumps({"type": "cancel", "id": "c"}))
        end = await next_json(ws)
        assert end["type"] == "end"
        assert end["stats"]["stop_reason"] == "cancelled"
        assert 0 < end["stats"]["frames"] < 90_000 // 80  # cut before its default length
    assert await asyncio.to_thread(slots_freed, "cut")

    ws = await connect(f"ws://127.0.0.1:{ray_app}/v1/stream", max_size=None)
    await ws.send(json.dumps({"type": "start", "id": "g", "text": "Another long one.", "session": "gone", **long}))
    async with asyncio.timeout(30):
        assert isinstance(await ws.recv(), bytes)
    before = await asyncio.to_thread(replica_of, "gone")
    assert before["free_slots"] < MAX_BATCH
    await ws.close()
    assert await asyncio.to_thread(slots_freed, "gone")
    after = await asyncio.to_thread(engine_stats, "gone")
    assert after["engine"]["cancelled"] == before["engine"]["cancelled"] + 1


@pytest.mark.asyncio
async def test_incremental_text_in_a_session(ray_app):
    """Text arriving in pieces is spoken sentence by sentence, every part on the session's replica
    (each a separate replica call), and the whole reply joins the session's memory there."""
    frames = 3
    async with connect(f"ws://127.0.0.1:{ray_app}/v1/stream", max_size=None) as ws:
        first = {"type": "start", "id": "inc", "incremental": True, "text": "Hello there. How", "seed": 3}
        await ws.send(json.dumps(first | {"session": "inc", "max_audio_ms": 80 * frames}))
        for piece in (" are you?", " Fine"):
            await ws.send(json.dumps({"type": "append", "id": "inc", "text": piece}))
        await ws.send(json.dumps({"type": "end", "id": "inc"}))
        samples = 0
        async with asyncio.timeout(60):
            while True:
                data = await ws.recv()
                if isinstance(data, bytes):
                    samples += unpack_audio(data)[2] * FRAME_SAMPLES
                    continue
                end = json.loads(data)
                if end.get("id") == "inc":
                    break
        assert end["type"] == "end", end
        assert end["stats"]["parts"] == 3, end
        assert end["stats"]["frames"] == 3 * frames
        assert samples == 3 * frames * FRAME_SAMPLES
        reply = await session_op(ws, "inc", "voice")
        assert reply["turns"] == 1  # the three parts are one agent turn, on the replica that spoke them
    stats = await asyncio.to_thread(engine_stats, "inc")
    assert stats["replica"] == reply["replica"]
    assert stats["holds"] == ["inc"]


@pytest.mark.asyncio
async def test_a_replica_dies_mid_reply(ray_app):
    """Kill the replica a conversation lives on while it speaks: the reply ends with a clear error
    ('busy': retry), the connection stays usable, and the conversation goes on on the other replica,
    with a fresh session there (its memory died with the replica). Runs last: it costs a replica."""
    turn = {"text": "Are you there?", "audio_b64": audio_to_b64(tone(0.3, freq=230))}
    long = {"max_ahead_s": 0.3, "chunks": {"first_frames": 1, "growth": 1.0, "max_frames": 1}}
    async with connect(f"ws://127.0.0.1:{ray_app}/v1/stream", max_size=None) as ws:
        home = (await session_op(ws, "doomed", "user_turn", **turn))["replica"]
        await ws.send(json.dumps({"type": "start", "id": "d", "text": "Goodbye.", "session": "doomed", **long}))
        async with asyncio.timeout(30):
            assert isinstance(await ws.recv(), bytes)
        actor = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{ENGINE_DEPLOYMENT}#{home}", namespace="serve")
        ray.kill(actor, no_restart=True)
        error = await next_json(ws)
        assert error["type"] == "error", error
        assert error["id"] == "d", error
        assert error["code"] == "busy", error
        assert "replica serving this request was lost" in error["message"]
        for _ in range(20):  # retry on "busy", as a client does, until Serve has dropped the dead replica
            await ws.send(json.dumps({"type": "session", "session": "doomed", "op": "user_turn", **turn}))
            reply = await next_json(ws)
            if reply["type"] == "session":
                break
            assert reply["code"] == "busy", reply
            await asyncio.sleep(0.25)
        assert reply["replica"] != home, reply
        assert reply["turns"] == 1, reply
        samples, end = await speak(ws, "after", 3, session="doomed")
        assert end["type"] == "end"
        assert samples == 3 * FRAME_SAMPLES

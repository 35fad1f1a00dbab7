"""End to end in a real browser: headless Chromium talks to `misotts-agents demo` over WebRTC.

A WAV file is Chromium's microphone (a short phrase, then silence, looped). The demo server runs the
tiny checkpoint on the CPU with the offline configuration (no speech recognizer, scripted replies),
so the whole path is real: mic -> WebRTC -> Silero VAD -> user turn -> scripted reply ->
MisoTTSService (tone-conditioned on the captured turn) -> WebRTC -> the page, which measures the
received track with WebAudio and getStats and shows the turn's figures. Then the page's tone switch
goes off and a voice clip is uploaded through its form; the next turn must be answered without
conditioning, in the uploaded voice. Everything runs in a network namespace with only loopback when this process
may create one (root with `unshare`), so no packet can leave 127.0.0.1.

Skipped only when Chromium is not installed (`.ci/run` installs it with apt-get).

The Twilio phone bot (examples/pipecat_phone_bot.py) is tested here too, without a browser: a real
WebSocket session on 127.0.0.1 speaking Twilio's media-stream protocol.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent / "browser"
sys.path.insert(0, str(HERE))

from e2e import find_chromium  # noqa: E402
from speech import make_mic_wav, make_voice_clip  # noqa: E402

needs_chromium = pytest.mark.skipif(
    find_chromium() is None, reason="chromium is not installed (apt-get install chromium)"
)


def _loopback_namespace() -> list[str]:
    """The command prefix that runs a command in a fresh loopback-only network namespace, if allowed."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None or os.geteuid() != 0:
        return []
    probe = subprocess.run([unshare, "-n", ip, "link", "set", "lo", "up"], capture_output=True)
    if probe.returncode != 0:
        return []
    return [unshare, "-n", "sh", "-c", f'{ip} link set lo up && exec "$@"', "sh"]


@pytest.fixture(scope="module")
def mic_wav(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("mic") / "mic.wav"
    # Chromium loops the file: the "user" speaks again about 12 s later (a second turn to answer).
    return path, make_mic_wav(path, lead_s=4.0, silence_s=7.0)


@needs_chromium
def test_demo_page_speaks_back_over_webrtc(tiny_dir: Path, mic_wav: tuple[Path, str], tmp_path: Path) -> None:
    wav, speech_source = mic_wav
    out = tmp_path / "result.json"
    netns = _loopback_namespace()
    clip = tmp_path / "voice.wav"
    clip_text, clip_s = make_voice_clip(clip)
    cmd = [*netns, sys.executable, str(HERE / "e2e.py"), "--model", str(tiny_dir), "--wav", str(wav)]
    cmd += ["--out", str(out), "--timeout", "40", "--loud-frames", "20", "--toggle-tone"]
    cmd += ["--voice-clip", str(clip), "--voice-text", clip_text]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    )
    # Its own process group: if it hangs, the server and Chromium it started go with it.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, f"driver failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    assert out.is_file(), f"driver failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    result = json.loads(out.read_text())
    page, stats, log = result["page"], result["stats"], "\n".join(result["server_log"])
    report = json.dumps(
        {
            "netns": bool(netns),
            "speech": speech_source,
            "page": {k: page.get(k) for k in ("state", "connectionState", "maxRms", "loudFrames", "firstAudioAt")},
            "events": page.get("events"),
            "turns": page.get("turns"),
            "rows": result["rows"],
            "voice": page.get("voice"),
            "stats": stats,
            "timings": result["timings"],
            "server": result["server_log"],
        },
        indent=1,
    )
    print(report)  # shown with -s; also part of every failure message below

    assert not page.get("errors"), report
    assert page.get("connectionState") == "connected", report
    # The page says which parts are real: here the voice; transcripts and replies are stand-ins.
    assert {k: v["real"] for k, v in page["info"]["parts"].items()} == {"stt": False, "llm": False, "tts": True}
    # The user's turn was heard (VAD on the fake microphone) and answered through MisoTTS,
    # conditioned on the captured audio of that turn.
    assert "user turn:" in log, report
    assert "scripted reply" in log, report
    assert "reply conditioned on: user" in log, report
    assert "MisoTTS audio streaming: 24000 Hz, 1 channel(s)" in log, report
    # The reply came back over WebRTC and is not silence: >= 1 s of 50 ms windows above RMS 0.01.
    assert page["loudFrames"] >= 20, report
    assert page["maxRms"] > 0.01, report
    # Opus at 48 kHz on the wire, and the receiver produced 48 kHz audio in real time (samples
    # counted over a 1 s window of wall time).
    assert stats["codec"]["mimeType"].lower() == "audio/opus", report
    assert stats["codec"]["clockRate"] == 48000, report
    inbound = stats["inbound"]
    assert inbound["packetsReceived"] > 50, report
    assert 40_000 < stats["receiveRate"] < 56_000, report

    # The page's turn table: the first answered turn shows the transcript (here the placeholder),
    # the reply's text, time to first audio (server and browser) and tone conditioning on.
    turns = sorted((t for t in page["turns"].values() if t.get("user")), key=lambda t: t["turn"])
    rows = {int(r["n"]): r for r in result["rows"]}
    first = turns[0]
    assert first["user"].startswith("(user spoke for"), report
    assert "seconds" in first["bot"], report
    assert first["tone_conditioning"], report
    assert first["context_turns"] >= 1, report
    assert 0 < first["tts_first_audio_s"] <= first["first_audio_after_user_s"] < 30, report
    assert 0 < first["heard_s"] < 30, report
    row = rows[first["turn"]]
    assert row["user"] == first["user"], report
    assert row["bot"].startswith(first["bot"]), report
    assert row["first"].endswith(" s)"), report
    assert row["heard"].endswith(" s"), report
    assert row["tone"].startswith("on ("), report
    # The switch, clicked during that reply, applies from the next one: answered unconditioned,
    # in the voice uploaded through the page meanwhile.
    assert page["toneAcks"] == [False], report
    later = turns[1]
    assert not later["tone_conditioning"], report
    assert later["context_turns"] == 0, report
    assert later["first_audio_after_user_s"] is not None, report
    assert rows[later["turn"]]["tone"] == "off", report
    assert "reply conditioned on: nothing (tone conditioning off)" in log, report
    assert abs(page["voice"]["seconds"] - clip_s) < 0.1, report
    assert "voice prompt uploaded-1 in use" in log, report


# -- the Twilio phone bot (examples/pipecat_phone_bot.py): a media-stream session on 127.0.0.1 ------


def _load_phone_bot():
    import importlib.util

    path = Path(__file__).parents[1] / "examples" / "pipecat_phone_bot.py"
    spec = importlib.util.spec_from_file_location("pipecat_phone_bot", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """G.711 mu-law, as Twilio sends it (written out here so the test checks the serializer against it)."""
    x = pcm.astype(np.int32)
    sign = (x < 0).astype(np.int32) << 7
    mag = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 7, 0, 7)
    mantissa = (mag >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def ulaw_decode(data: bytes) -> np.ndarray:
    u = ~np.frombuffer(data, dtype=np.uint8).astype(np.int32) & 0xFF
    exponent, mantissa = (u >> 4) & 0x07, u & 0x0F
    mag = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -mag, mag).astype(np.int16)


def test_ulaw_codec_roundtrip() -> None:
    pcm = (np.sin(np.linspace(0, 60, 8000)) * 20000).astype(np.int16)
    back = ulaw_decode(ulaw_encode(pcm))
    assert np.max(np.abs(back.astype(np.int32) - pcm)) <= 32635 // 32  # mu-law step at full scale


@pytest.mark.parametrize("via", ["in-process", "server"])
def test_phone_bot_twilio_media_stream_roundtrip(engine, tiny_dir: Path, tmp_path: Path, via: str) -> None:
    """TwiML, then a Twilio media stream over a real WebSocket: start, 20 ms mu-law media (a spoken
    phrase, then silence), stop, close. The bot must answer the turn with 8 kHz mu-law media, paced in
    real time, and stop generating when the call ends. ``server``: the bot speaks through a
    ``misotts-agents serve`` server (``--url``) holding the engine; the hang-up must free its slot there."""
    import base64
    import threading
    import time
    import urllib.request

    import soundfile as sf
    import soxr
    import uvicorn
    from remote_server import LoopbackServer
    from websockets.sync.client import connect

    from misotts_agents.tools.demo import DemoOptions

    bot = _load_phone_bot()
    tts_server = LoopbackServer(engine) if via == "server" else None
    where = {"url": tts_server.url, "token": tts_server.token} if tts_server else {}
    options = DemoOptions(model=str(tiny_dir), watermark=False, stt="none", llm="scripted", greeting="", **where)
    app = bot.create_app(options, None if tts_server else engine)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        assert thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/twiml", method="POST", data=b"CallSid=CA1")
        with urllib.request.urlopen(req, timeout=10) as r:
            twiml = r.read().decode()
        assert f'<Stream url="ws://127.0.0.1:{port}/ws" />' in twiml, twiml
        assert "<Connect>" in twiml, twiml

        wav = tmp_path / "phrase.wav"
        make_mic_wav(wav, lead_s=0.2, silence_s=0.0)
        audio, rate = sf.read(wav, dtype="float32")
        pcm8k = (soxr.resample(audio, rate, 8000) * 32767).astype(np.int16)
        speech = ulaw_encode(pcm8k)
        silence = ulaw_encode(np.zeros(160, dtype=np.int16))

        received: list[tuple[float, dict]] = []
        stop_sending = threading.Event()
        with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10) as ws:
            sid = "MZ0123456789abcdef0123456789abcdef"
            ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            ws.send(
                json.dumps(
                    {
                        "event": "start",
                        "sequenceNumber": "1",
                        "streamSid": sid,
                        "start": {
                            "streamSid": sid,
                            "callSid": "CA0123456789abcdef0123456789abcdef",
                            "accountSid": "AC0123456789abcdef0123456789abcdef",
                            "tracks": ["inbound"],
                            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                        },
                    }
                )
            )

            def send_media() -> None:  # like Twilio: 20 ms frames in real time, speech then silence
                chunk, seq, t0 = 0, 2, time.monotonic()
                while not stop_sending.is_set():
                    start = chunk * 160
                    payload = speech[start : start + 160] if start < len(speech) else silence
                    message = {
                        "event": "media",
                        "sequenceNumber": str(seq),
                        "streamSid": sid,
                        "media": {
                            "track": "inbound",
                            "chunk": str(chunk),
                            "timestamp": str(chunk * 20),
                            "payload": base64.b64encode(payload.ljust(160, silence[:1])).decode(),
                        },
                    }
                    try:
                        ws.send(json.dumps(message))
                    except Exception:
                        return
                    chunk, seq = chunk + 1, seq + 1
                    time.sleep(max(0.0, t0 + chunk * 0.02 - time.monotonic()))

            sender = threading.Thread(target=send_media, daemon=True)
            sender.start()
            speech_end = time.monotonic() + len(speech) / 8000
            deadline = time.monotonic() + 45
            media_bytes = 0
            while time.monotonic() < deadline and media_bytes < 8000 * 2:  # 2 s of the bot's voice
                try:
                    message = json.loads(ws.recv(timeout=1))
                except TimeoutError:
                    continue
                received.append((time.monotonic(), message))
                if message.get("event") == "media":
                    media_bytes += len(base64.b64decode(message["media"]["payload"]))
            stop_sending.set()
            sender.join(5)
            ws.send(json.dumps({"event": "stop", "sequenceNumber": "999", "streamSid": sid, "stop": {}}))
        # Twilio closes the socket after "stop"; the bot must then end the call's pipeline, which
        # cancels the reply still being generated and frees its engine slot.
        deadline = time.monotonic() + 10
        while engine.metrics().active and time.monotonic() < deadline:
            time.sleep(0.1)
        active_after_hangup = engine.metrics().active
    finally:
        server.should_exit = True
        thread.join(15)
        if tts_server is not None:
            tts_server.stop()

    media = [(t, m) for t, m in received if m.get("event") == "media"]
    assert media, f"no media came back; got events {[m.get('event') for _, m in received]}"
    assert all(m["streamSid"] == sid for _, m in media)
    assert media[0][0] > speech_end - 0.5, "the bot answered before the user finished speaking"
    pcm_back = ulaw_decode(b"".join(base64.b64decode(m["media"]["payload"]) for _, m in media))
    rms = float(np.sqrt(np.mean(pcm_back.astype(np.float64) ** 2)))
    seconds = pcm_back.size / 8000
    span = media[-1][0] - media[0][0]
    print(f"phone bot: {len(media)} media messages, {seconds:.2f} s of 8 kHz mu-law in {span:.2f} s, rms {rms:.0f}")
    assert rms > 100, f"the reply is silent (rms {rms:.1f})"
    assert seconds >= 2.0
    # Paced for playback: the output transport sends in real time (plus a small send-ahead buffer).
    assert span > 0.5 * seconds, f"{seconds:.2f} s of audio arrived in {span:.2f} s"
    assert active_after_hangup == 0, "the reply kept generating after the call ended"


# -- the demo's offline pieces and command line -------------------------------------------------


def test_scripted_reply_is_honest_about_placeholders() -> None:
    from misotts_agents.tools.demo import scripted_reply

    reply = scripted_reply("(user spoke for 1.4 s) (user spoke for 2.7 s)", 0)
    assert "4.1 seconds" in reply
    assert "speech recognizer" in reply
    assert scripted_reply("  what  time is it ", 1) == "You said: what time is it"
    assert scripted_reply("", 0) == "I didn't catch that."


class FakeOllama:
    """A stand-in for a local Ollama: answers ``GET /api/tags`` like Ollama does, on a loopback port."""

    def __init__(self, models: list[str]) -> None:
        import http.server
        import threading

        tags = json.dumps({"models": [{"name": m, "model": m, "size": 1} for m in models]}).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                ok = self.path == "/api/tags"
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(tags if ok else b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def no_keys(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No API keys, no local Ollama (a port nothing listens on), no local Whisper."""
    from misotts_agents.tools.demo import services

    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "DEEPGRAM_API_KEY", "OPENAI_MODEL"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{closed}")
    monkeypatch.setattr(services, "whisper_problem", lambda model: "faster-whisper is not installed")
    return monkeypatch


def test_service_choice_follows_keys(no_keys: pytest.MonkeyPatch) -> None:
    from misotts_agents.tools.demo import resolve_llm, resolve_stt

    assert (resolve_stt("auto"), resolve_llm("auto")) == ("none", "scripted")
    no_keys.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    assert (resolve_stt("auto"), resolve_llm("auto")) == ("none", "openai")
    no_keys.setenv("OPENAI_API_KEY", "sk-test")
    assert (resolve_stt("auto"), resolve_llm("auto")) == ("openai", "openai")
    assert resolve_stt("none") == "none"
    assert resolve_llm("scripted") == "scripted"


def test_local_llm_when_ollama_answers(no_keys: pytest.MonkeyPatch) -> None:
    """Without keys, a local Ollama with a model pulled answers the turns; the page says it is real."""
    from misotts_agents.tools.demo import DemoOptions, describe, make_llm, prepare
    from misotts_agents.tools.demo.services import ollama_url, parts, pick_ollama_model

    ollama = FakeOllama(["nomic-embed-text:latest", "llama3.2:latest"])
    try:
        no_keys.setenv("OLLAMA_HOST", ollama.host)
        assert ollama_url() == f"http://{ollama.host}"
        options = prepare(DemoOptions(model="tiny"))
        assert (options.stt, options.llm, options.llm_model) == ("none", "ollama", "llama3.2:latest")
        assert parts(options)["llm"] == {"kind": "ollama", "real": True, "what": "local Ollama LLM (llama3.2:latest)"}
        assert parts(options)["stt"]["real"] is False
        assert "placeholders" in describe(options)
        llm = make_llm(options.llm, options.llm_model)
        assert type(llm).__name__ == "OLLamaLLMService"
        assert str(llm._client.base_url).startswith(ollama_url())
        # A model asked for by name (with or without its tag) must be pulled there.
        assert prepare(DemoOptions(llm="ollama", llm_model="llama3.2")).llm_model == "llama3.2:latest"
        with pytest.raises(SystemExit, match="ollama pull"):
            prepare(DemoOptions(llm="ollama", llm_model="mistral"))
        # Keys still win over the local server.
        no_keys.setenv("OPENAI_API_KEY", "sk-test")
        assert prepare(DemoOptions()).llm == "openai"
    finally:
        ollama.close()
    no_keys.delenv("OPENAI_API_KEY")
    assert prepare(DemoOptions()).llm == "scripted"  # it stopped answering
    empty = FakeOllama([])  # running, nothing pulled: not a usable LLM
    try:
        no_keys.setenv("OLLAMA_HOST", f"http://{empty.host}/")
        assert prepare(DemoOptions()).llm == "scripted"
    finally:
        empty.close()
    assert pick_ollama_model(None, ["phi3:mini", "qwen2.5:3b"]) == "qwen2.5:3b"
    assert pick_ollama_model(None, ["phi3:mini"]) == "phi3:mini"
    no_keys.setenv("OLLAMA_HOST", "0.0.0.0")
    assert ollama_url() == "http://127.0.0.1:11434"


def test_local_whisper_when_its_model_is_there(no_keys: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With faster-whisper installed, auto picks it and fetches and loads its model once, before
    serving; when that fails (here: offline, not cached) auto falls back to placeholders, an explicit
    --stt whisper stops with the reason."""
    from misotts_agents.tools.demo import DemoOptions, prepare, resolve_stt, services, whisper
    from misotts_agents.tools.demo.services import parts

    loaded: list[str] = []

    def fake_load(name: str) -> object:  # stands in for the download and the CTranslate2 load
        loaded.append(name)
        return object()

    no_keys.setattr(services, "whisper_problem", lambda model: None)
    no_keys.setattr(whisper, "load_whisper", fake_load)
    options = prepare(DemoOptions(model="tiny"))
    assert (options.stt, options.stt_model, loaded) == ("whisper", whisper.DEFAULT_WHISPER, [whisper.DEFAULT_WHISPER])
    assert parts(options)["stt"] == {"kind": "whisper", "real": True, "what": "local Whisper (small.en)"}

    def no_network(name: str) -> object:
        raise OSError("could not reach the Hub")

    no_keys.setattr(whisper, "load_whisper", no_network)
    assert prepare(DemoOptions()).stt == "none"
    with pytest.raises(SystemExit, match="could not reach the Hub"):
        prepare(DemoOptions(stt="whisper"))

    # The real availability check (faster-whisper is a dev dependency): offline, with an empty
    # Hugging Face cache, the default model cannot be had; a local directory needs model.bin.
    no_keys.undo()
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "DEEPGRAM_API_KEY"):
        no_keys.delenv(name, raising=False)
    from huggingface_hub import constants

    no_keys.setattr(constants, "HF_HUB_OFFLINE", True)
    no_keys.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    problem = services.whisper_problem(None)
    assert problem is not None
    assert "not in the Hugging Face cache" in problem
    assert resolve_stt("auto") == "none"
    (tmp_path / "w").mkdir()
    assert "model.bin" in services.whisper_problem(str(tmp_path / "w"))
    (tmp_path / "w" / "model.bin").write_bytes(b"")
    assert services.whisper_problem(str(tmp_path / "w")) is None
    assert resolve_stt("auto", str(tmp_path / "w")) == "whisper"


def test_voice_upload_is_checked(tmp_path: Path) -> None:
    """The page's voice clip: any audio file, decoded to 24 kHz mono; junk, a clip too short or too
    long, or a missing transcript is a clear error."""
    import soundfile as sf

    from misotts_agents.errors import InvalidRequest
    from misotts_agents.tools.demo.voice import voice_from_upload

    def clip(seconds: float, rate: int = 44_100, fmt: str = "WAV") -> bytes:
        path = tmp_path / f"clip.{fmt.lower()}"
        t = np.arange(int(seconds * rate)) / rate
        sf.write(path, np.stack([np.sin(2 * np.pi * 200 * t)] * 2, axis=1) * 0.3, rate, format=fmt)
        return path.read_bytes()

    voice = voice_from_upload(clip(3.0, fmt="FLAC"), " Hello there. ", speaker=0)
    assert voice.sample_rate == 24_000
    assert abs(len(voice.audio) / 24_000 - 3.0) < 0.02
    assert voice.text == "Hello there."
    for data, text, message in (
        (b"not audio at all" * 100, "Hi.", "could not be decoded"),
        (clip(0.4), "Hi.", "0.4 s long"),
        (clip(31.5, rate=8000), "Hi.", "31"),
        (clip(2.0), "  ", "transcript"),
        (b"", "Hi.", "empty"),
    ):
        with pytest.raises(InvalidRequest, match=message):
            voice_from_upload(data, text, speaker=0)


def test_demo_help_is_light() -> None:
    """`misotts-agents demo --help` and the WebRTC example's --help import neither Pipecat nor torch."""
    code = (
        "import sys, contextlib, io\n"
        "from misotts_agents.tools import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    cli.main(['demo', '--help'])\n"
        "assert '--no-watermark' in out.getvalue() and '--stt' in out.getvalue()\n"
        "heavy = [m for m in ('pipecat', 'torch', 'fastapi') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    example = Path(__file__).parents[1] / "examples" / "pipecat_webrtc_bot.py"
    out = subprocess.run([sys.executable, str(example), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--model" in out.stdout, out.stderr
    assert "--llm" in out.stdout, out.stderr

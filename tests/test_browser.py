"""End to end in a real browser: headless Chromium talks to `misotts-agents demo` over WebRTC.

A WAV file is Chromium's microphone (a short phrase, then silence). The demo server runs the tiny
checkpoint on the CPU with the offline configuration (no speech recognizer, scripted replies), so the
whole path is real: mic -> WebRTC -> Silero VAD -> user turn -> scripted reply -> MisoTTSService
(tone-conditioned on the captured turn) -> WebRTC -> the page, which measures the received track with
WebAudio and getStats. Everything runs in a network namespace with only loopback when this process
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
from speech import make_mic_wav  # noqa: E402

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
    return path, make_mic_wav(path)


@needs_chromium
def test_demo_page_speaks_back_over_webrtc(tiny_dir: Path, mic_wav: tuple[Path, str], tmp_path: Path) -> None:
    wav, speech_source = mic_wav
    out = tmp_path / "result.json"
    netns = _loopback_namespace()
    cmd = [*netns, sys.executable, str(HERE / "e2e.py"), "--model", str(tiny_dir), "--wav", str(wav)]
    cmd += ["--out", str(out), "--timeout", "40", "--loud-frames", "20"]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    )
    # Its own process group: if it hangs, the server and Chromium it started go with it.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0 and out.is_file(), f"driver failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    result = json.loads(out.read_text())
    page, stats, log = result["page"], result["stats"], "\n".join(result["server_log"])
    report = json.dumps(
        {
            "netns": bool(netns),
            "speech": speech_source,
            "page": {k: page.get(k) for k in ("state", "connectionState", "maxRms", "loudFrames", "firstAudioAt")},
            "events": page.get("events"),
            "stats": stats,
            "timings": result["timings"],
            "server": result["server_log"],
        },
        indent=1,
    )
    print(report)  # shown with -s; also part of every failure message below

    assert not page.get("errors") and page.get("connectionState") == "connected", report
    # The user's turn was heard (VAD on the fake microphone) and answered through MisoTTS,
    # conditioned on the captured audio of that turn.
    assert "user turn:" in log and "scripted reply" in log, report
    assert "reply conditioned on: user" in log, report
    assert "MisoTTS audio streaming: 24000 Hz, 1 channel(s)" in log, report
    # The reply came back over WebRTC and is not silence: >= 1 s of 50 ms windows above RMS 0.01.
    assert page["loudFrames"] >= 20 and page["maxRms"] > 0.01, report
    # Opus at 48 kHz on the wire, and the receiver produced 48 kHz audio in real time (samples
    # counted over a 1 s window of wall time).
    assert stats["codec"]["mimeType"].lower() == "audio/opus" and stats["codec"]["clockRate"] == 48000, report
    inbound = stats["inbound"]
    assert inbound["packetsReceived"] > 50, report
    assert 40_000 < stats["receiveRate"] < 56_000, report


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
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/twiml", method="POST", data=b"CallSid=CA1")
        with urllib.request.urlopen(req, timeout=10) as r:
            twiml = r.read().decode()
        assert f'<Stream url="ws://127.0.0.1:{port}/ws" />' in twiml and "<Connect>" in twiml, twiml

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
    assert "4.1 seconds" in reply and "speech recognizer" in reply
    assert scripted_reply("  what  time is it ", 1) == "You said: what time is it"
    assert scripted_reply("", 0) == "I didn't catch that."


def test_service_choice_follows_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from misotts_agents.tools.demo import resolve_llm, resolve_stt

    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "DEEPGRAM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert (resolve_stt("auto"), resolve_llm("auto")) == ("none", "scripted")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    assert (resolve_stt("auto"), resolve_llm("auto")) == ("none", "openai")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert (resolve_stt("auto"), resolve_llm("auto")) == ("openai", "openai")
    assert resolve_stt("none") == "none" and resolve_llm("scripted") == "scripted"


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
    assert out.returncode == 0 and "--model" in out.stdout and "--llm" in out.stdout, out.stderr

"""Drive the demo in headless Chromium: a WAV file is the microphone, the page measures the bot's audio.

Run by tests/test_browser.py (inside a loopback-only network namespace when it can make one), or by
hand::

    uv run python tests/browser/e2e.py --model out/tiny --wav speech.wav

It starts ``misotts-agents demo`` on a free 127.0.0.1 port, opens ``/?autostart=1`` in Chromium
with a fake microphone fed from the WAV, polls the page (``window.miso``) over the DevTools
protocol until the bot's audio has been heard and the page shows the answered turn's figures, then
prints one JSON object: the page's measurements (WebAudio RMS of the received track, getStats
inbound-rtp and codec), its turn table, its event log, the server's log lines about user turns and
replies, and timings.

With ``--toggle-tone`` it then switches tone conditioning off on the page (and with ``--voice-clip``
uploads a voice clip through the page's form) and waits for the next answered turn (Chromium loops
the microphone file, so the "user" speaks again).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-breakpad",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--allow-loopback-in-peer-connection",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]


def find_chromium() -> str | None:
    # The Debian wrapper (/usr/bin/chromium) only adds flags; the binary itself is enough.
    for path in ("/usr/lib/chromium/chromium", "/usr/bin/chromium"):
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"demo server exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"demo server did not listen on port {port} within {timeout:.0f} s")


class DevTools:
    """The smallest Chrome DevTools Protocol client that evaluates JavaScript in one page."""

    def __init__(self, profile: Path, timeout: float = 20.0) -> None:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium opened no page")
            time.sleep(0.1)
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10).__enter__()
        self.next_id = 0

    def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        self.ws.close()


SERVER_LOG_KEYS = (
    "user turn:",
    "scripted reply",
    "reply conditioned on",
    "MisoTTS spoke",
    "MisoTTS audio streaming",
    "client connected",
    "tone conditioning",
    "voice prompt",
    "voice clip",
    "ERROR",
)
STATE_JS = "JSON.stringify(window.miso || null)"
STATS_JS = """(async () => {
  const s = await window.misoStats(); if (!s) return null;
  const t1 = performance.now();
  await new Promise(r => setTimeout(r, 1000));
  const s2 = await window.misoStats();
  const seconds = (performance.now() - t1) / 1000;
  const pick = (r, keys) => r ? Object.fromEntries(keys.map(k => [k, r[k]])) : null;
  return JSON.stringify({
    inbound: pick(s2.inbound, ["packetsReceived", "bytesReceived", "totalSamplesReceived",
                               "totalSamplesDuration", "concealedSamples", "silentConcealedSamples"]),
    codec: pick(s2.codec, ["mimeType", "clockRate", "channels"]),
    // samples the receiver produced per second of wall time, over a 1 s window
    receiveRate: (s2.inbound.totalSamplesReceived - s.inbound.totalSamplesReceived) / seconds});
})()"""


# The page's table row of a turn: what a person sees (cell texts), read from the DOM.
ROWS_JS = """JSON.stringify([...document.querySelectorAll('#turns tbody tr')].map(
  tr => Object.fromEntries([...tr.children].map(td => [td.dataset.col, td.textContent]))))"""


def answered(state: dict, after: int = 0) -> dict | None:
    """The first turn after ``after`` that answers the user and shows its time to first audio."""
    for key in sorted(state.get("turns") or {}, key=int):
        turn = state["turns"][key]
        if int(key) > after and turn.get("user") and turn.get("first_audio_after_user_s") is not None:
            return turn
    return None


def poll(devtools: DevTools, done, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    state: dict = {}
    while time.monotonic() < deadline:
        state = json.loads(devtools.evaluate(STATE_JS) or "null") or {}
        if state.get("state") == "error" or done(state):
            break
        time.sleep(0.25)
    return state


def upload_voice(devtools: DevTools, clip: Path, text: str) -> None:
    """Fill the page's voice form (file input and transcript) and press its button, as a person would."""
    root = devtools.call("DOM.getDocument")["root"]["nodeId"]
    node = devtools.call("DOM.querySelector", nodeId=root, selector="#voice-file")["nodeId"]
    devtools.call("DOM.setFileInputFiles", files=[str(clip)], nodeId=node)
    devtools.evaluate(
        f"document.getElementById('voice-text').value = {json.dumps(text)}; "
        "document.getElementById('voice-send').click(); true"
    )


def run(
    model: str,
    wav: Path,
    *,
    timeout: float,
    want_loud_frames: int,
    watermark: bool,
    greeting: str = "",
    toggle_tone: bool = False,
    voice_clip: Path | None = None,
    voice_text: str = "",
) -> dict:
    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError("chromium is not installed")
    port = free_port()
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory(prefix="misotts-browser-") as tmp:
        tmp_path = Path(tmp)
        server_log = tmp_path / "server.log"
        verbose = ["-v"] if os.environ.get("MISOTTS_E2E_SERVER_LOG") else []
        cmd = [
            sys.executable,
            "-m",
            "misotts_agents.tools.cli",
            *verbose,
            "demo",
            "--model",
            model,
            "--port",
            str(port),
        ]
        cmd += ["--host", "127.0.0.1", "--greeting", greeting, "--stt", "none", "--llm", "scripted"]
        if not watermark:
            cmd.append("--no-watermark")
        with open(server_log, "w") as log_file:
            server = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        browser = None
        result: dict = {"port": port}
        try:
            wait_port(port, server, timeout=120)
            timings["server_up_s"] = time.monotonic() - t0
            profile = tmp_path / "profile"
            browser = subprocess.Popen(
                [
                    chromium,
                    *CHROMIUM_FLAGS,
                    f"--use-file-for-fake-audio-capture={wav}",
                    f"--user-data-dir={profile}",
                    "--remote-debugging-port=0",
                    f"http://127.0.0.1:{port}/?autostart=1",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            devtools = DevTools(profile)
            t_page = time.monotonic()
            state = poll(
                devtools, lambda s: s.get("loudFrames", 0) >= want_loud_frames and answered(s) is not None, timeout
            )
            timings["page_s"] = time.monotonic() - t_page
            if state.get("firstAudioAt") is not None:
                timings["first_bot_audio_after_page_load_s"] = state["firstAudioAt"]
            first = answered(state)
            if toggle_tone and first is not None:
                devtools.evaluate("document.getElementById('tone').click(), true")  # on -> off
                if voice_clip is not None:
                    upload_voice(devtools, voice_clip, voice_text)
                t_toggle = time.monotonic()
                state = poll(devtools, lambda s: answered(s, first["turn"]) is not None, timeout)
                timings["next_turn_after_toggle_s"] = time.monotonic() - t_toggle
            result["page"] = state
            result["rows"] = json.loads(devtools.evaluate(ROWS_JS) or "[]")
            result["stats"] = json.loads(devtools.evaluate(STATS_JS) or "null")
            devtools.evaluate("window.pc && window.pc.close(), true")  # the bot sees 'closed' at once
            devtools.close()
        finally:
            if browser is not None:
                browser.terminate()
                try:
                    browser.wait(10)
                except subprocess.TimeoutExpired:
                    browser.kill()
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log_text = server_log.read_text(errors="replace")
            if os.environ.get("MISOTTS_E2E_SERVER_LOG"):  # keep the whole log, for debugging
                Path(os.environ["MISOTTS_E2E_SERVER_LOG"]).write_text(log_text)
            result["server_log"] = [line for line in log_text.splitlines() if any(k in line for k in SERVER_LOG_KEYS)]
            result["server_log_tail"] = log_text.splitlines()[-30:]
    timings["total_s"] = time.monotonic() - t0
    result["timings"] = timings
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--wav", required=True, type=Path)
    p.add_argument("--timeout", type=float, default=45.0, help="seconds to wait for the bot's audio")
    p.add_argument("--loud-frames", type=int, default=10, help="50 ms windows of bot audio to wait for")
    p.add_argument("--watermark", action="store_true")
    p.add_argument("--greeting", default="", help="the demo's greeting (default: none, so audio means a reply)")
    p.add_argument("--toggle-tone", action="store_true", help="then switch tone conditioning off, await a turn")
    p.add_argument("--voice-clip", type=Path, help="with --toggle-tone: also upload this clip as the voice")
    p.add_argument("--voice-text", default="", help="the voice clip's transcript")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()
    result = run(
        args.model,
        args.wav.resolve(),
        timeout=args.timeout,
        want_loud_frames=args.loud_frames,
        watermark=args.watermark,
        greeting=args.greeting,
        toggle_tone=args.toggle_tone,
        voice_clip=args.voice_clip.resolve() if args.voice_clip else None,
        voice_text=args.voice_text,
    )
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

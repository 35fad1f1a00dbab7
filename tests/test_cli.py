"""The command line, in process: make-tiny, say (streaming, watermarked, codes out), watermark-check."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from signals import tone

from misotts_agents.tools.cli import main


def test_say_writes_audio_and_codes(tiny_dir, tmp_path, capsys):
    out, codes = tmp_path / "hello.wav", tmp_path / "codes.npy"
    rc = main(
        [
            "say",
            "Hello from Miso.",
            "--out",
            str(out),
            "--model",
            str(tiny_dir),
            "--seed",
            "3",
            "--max-ms",
            "640",
            "--codes-out",
            str(codes),
        ]
    )
    assert rc == 0
    audio, rate = sf.read(out)
    assert rate == 24_000
    assert audio.ndim == 1
    assert audio.size == 8 * 1920
    saved = np.load(codes)
    assert saved.shape == (8, 32)
    assert np.issubdtype(saved.dtype, np.integer)
    assert "8 frames (max_frames)" in capsys.readouterr().out


def test_say_with_voice_and_context_is_reproducible(tiny_dir, tmp_path):
    voice, user = tmp_path / "voice.wav", tmp_path / "user.wav"
    sf.write(voice, tone(1.0, 48_000), 48_000)
    sf.write(user, np.stack([tone(0.5, 16_000), tone(0.5, 16_000, 330)], axis=1), 16_000)
    args = ["--model", str(tiny_dir), "--seed", "9", "--max-ms", "320", "--no-watermark"]
    args += ["--voice", str(voice), "--voice-text", "This is me.", "--context-audio", str(user)]
    args += ["--context-text", "Hm, really?"]
    for name in ("a", "b"):
        assert main(["say", "Yes, really.", "--out", str(tmp_path / f"{name}.wav"), *args]) == 0
    a, _ = sf.read(tmp_path / "a.wav")
    b, _ = sf.read(tmp_path / "b.wav")
    np.testing.assert_array_equal(a, b)


def test_say_voice_without_transcript_is_refused(tiny_dir, tmp_path):
    sf.write(tmp_path / "v.wav", tone(0.5), 24_000)
    with pytest.raises(SystemExit, match="transcript"):
        main(
            [
                "say",
                "Hi.",
                "--out",
                str(tmp_path / "o.wav"),
                "--model",
                str(tiny_dir),
                "--voice",
                str(tmp_path / "v.wav"),
            ]
        )


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    rc = main(["say", "Hi.", "--out", str(tmp_path / "o.wav"), "--model", str(tmp_path / "nothing")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no such directory" in err
    assert "make-tiny" in err


def test_watermark_check_reports(tiny_dir, tmp_path, capsys):
    path = tmp_path / "clip.wav"
    sf.write(path, tone(1.2), 24_000)
    rc = main(["watermark-check", str(path), "--watermark-model", str(tiny_dir / "silentcipher")])
    out = capsys.readouterr().out
    assert rc in (0, 1)
    assert str(path) in out
    assert "not watermarked" in out or "watermarked" in out


def test_watermark_check_reports_a_message_without_confidence(tiny_dir, tmp_path, capsys, monkeypatch):
    """A detection may carry a message without a confidence (its type allows it): the report says so."""
    import misotts_agents.model.watermark as watermark

    found = watermark.WatermarkDetection(True, (0, 0, 0, 0, 0), None, "message matches the key")
    monkeypatch.setattr(watermark, "check_file", lambda *args, **kwargs: found)
    path = tmp_path / "clip.wav"
    sf.write(path, tone(1.2), 24_000)
    rc = main(["watermark-check", str(path), "--watermark-model", str(tiny_dir / "silentcipher")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "watermarked (message [0, 0, 0, 0, 0], confidence n/a); message matches the key" in out


def test_make_tiny_writes_a_complete_directory(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "t"), "--seed", "1"]) == 0
    names = {p.name for p in (tmp_path / "t").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "mimi.safetensors", "silentcipher"} <= names


def test_help_is_fast_and_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "misotts_agents.tools.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("demo", "say", "make-tiny", "bench", "watermark-check"):
        assert command in out


def test_bench_runs_and_plots(tiny_dir, tmp_path, capsys):
    plot = tmp_path / "bench.png"
    args = ["--model", str(tiny_dir), "--levels", "1,2", "--frames", "3", "--plot", str(plot), "--bandwidth-gbs", "100"]
    assert main(["bench", *args]) == 0
    out = capsys.readouterr().out
    assert "batched" in out
    assert "sequential" in out
    assert "bandwidth floor at 100 GB/s" in out
    assert plot.stat().st_size > 10_000


def test_bench_measures_the_step_loop_without_overlap_side_by_side(tiny_dir, tmp_path, capsys):
    plot = tmp_path / "bench.png"
    args = ["--model", str(tiny_dir), "--levels", "2", "--frames", "2", "--plot", str(plot), "--bandwidth-gbs", "100"]
    assert main(["bench", *args, "--modes", "batched,no-overlap"]) == 0
    out = capsys.readouterr().out
    assert "no-overlap" in out
    record = json.loads(plot.with_suffix(".json").read_text())
    assert [r["mode"] for r in record["results"]] == ["batched", "no-overlap"]
    assert set(record["floor"]["levels_no_overlap"]) == {"2"}
    with pytest.raises(SystemExit):
        main(["bench", *args, "--modes", "batched,overlapped"])


def test_serve_runs_the_server_with_named_voices(tiny_dir, tmp_path):
    """The real command in its own process: loads the model, serves the OpenAI endpoint with a --voice."""
    import socket

    import httpx

    from misotts_agents.audio import write_wav

    write_wav(tmp_path / "anna.wav", tone(1.0, freq=190))
    (tmp_path / "anna.txt").write_text("I am Anna.\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--model", str(tiny_dir), "--device", "cpu", "--no-watermark", "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "misotts_agents.tools.cli", "serve", *args, "--voice", f"anna={tmp_path / 'anna.wav'}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.3)
        body = {"input": "Hello.", "voice": "anna", "response_format": "pcm", "max_audio_ms": 160}
        r = httpx.post(f"{url}/v1/audio/speech", json=body, timeout=60)
        assert r.status_code == 200
        assert len(r.content) == 2 * 2 * 1920
        r = httpx.post(f"{url}/v1/audio/speech", json={**body, "voice": "bob"}, timeout=60)
        assert r.status_code == 400
        assert "anna" in r.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_voice_needs_a_transcript(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no transcript"):
        main(["serve", "--voice", f"anna={tmp_path / 'anna.wav'}"])
    with pytest.raises(SystemExit, match="NAME=CLIP"):
        main(["serve", "--voice", "anna"])

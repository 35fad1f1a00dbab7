"""Tests for misotts_agents.model.watermark against a random-weight SilentCipher checkpoint (offline).

Random weights exercise everything but the decoded message: loading, file checks, shapes, lengths,
resampling, error handling and the streaming wrapper.  Logic that depends on what the decoder returns
(key matching, failure handling) is checked with a small stand-in model.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from misotts_agents.model import watermark as wm
from misotts_agents.model.watermark import (
    DEFAULT_WATERMARK_KEY,
    MIN_DETECT_SAMPLES_44K,
    StreamWatermarker,
    WatermarkDetection,
    Watermarker,
    WatermarkUnavailable,
    check_file,
    resolve_silentcipher_dir,
)
from misotts_agents.testing.silentcipher import make_tiny_silentcipher

SR = 24000


def speechlike(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    """A few harmonics of a gliding 140 Hz fundamental, amplitude-modulated, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sr)) / sr
    f0 = 140.0 + 20.0 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    sig = sum(np.sin(k * phase) / k for k in range(1, 6))
    sig = sig * (0.6 + 0.4 * np.sin(2 * np.pi * 3.0 * t)) * 0.2
    sig = sig + 0.005 * rng.standard_normal(t.shape)
    return sig.astype(np.float32)


@pytest.fixture(scope="session")
def sc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_silentcipher(tmp_path_factory.mktemp("silentcipher") / "73999_iteration")


@pytest.fixture(scope="session")
def watermarker(sc_dir: Path) -> Watermarker:
    return Watermarker.load(sc_dir)


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[object]:
    """Force huggingface_hub offline with an empty cache, and record any socket connection attempt.

    huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE at import time, so the module constants are
    patched as well as the environment.
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    attempts: list[object] = []

    def no_connect(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    return attempts


# --------------------------------------------------------------------------- resolving / loading


def test_tiny_silentcipher_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    """Building the fixture draws its weights from a forked RNG: the same seed gives the same files,
    and the caller's random stream goes on as if nothing had happened."""
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = make_tiny_silentcipher(tmp_path / "a", seed=5)
    assert torch.equal(torch.rand(3), expected)
    second = make_tiny_silentcipher(tmp_path / "b", seed=5)
    for name in ("enc_c.ckpt", "dec_c.ckpt", "dec_m_0.ckpt"):
        a, b = torch.load(first / name), torch.load(second / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_from_local_dir(watermarker: Watermarker, sc_dir: Path) -> None:
    assert watermarker.source_dir == sc_dir
    assert watermarker.key == DEFAULT_WATERMARK_KEY
    assert resolve_silentcipher_dir(str(sc_dir)) == sc_dir


def test_resolve_accepts_hub_layout(tmp_path: Path, sc_dir: Path) -> None:
    nested = tmp_path / "silentcipher" / "44_1_khz" / "73999_iteration"
    nested.mkdir(parents=True)
    for name in wm.REQUIRED_FILES:
        (nested / name).symlink_to(sc_dir / name)
    assert resolve_silentcipher_dir(tmp_path / "silentcipher") == nested


@pytest.mark.parametrize("missing", ["hparams.yaml", "dec_m_0.ckpt"])
def test_missing_file_is_named(tmp_path: Path, sc_dir: Path, missing: str) -> None:
    for name in wm.REQUIRED_FILES:
        if name != missing:
            (tmp_path / name).symlink_to(sc_dir / name)
    with pytest.raises(WatermarkUnavailable, match=missing) as info:
        Watermarker.load(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "--no-watermark" in str(info.value)


def test_corrupt_checkpoint(tmp_path: Path, sc_dir: Path) -> None:
    for name in wm.REQUIRED_FILES:
        shutil.copy(sc_dir / name, tmp_path / name)
    (tmp_path / "dec_c.ckpt").write_bytes(b"this is not a torch checkpoint")
    with pytest.raises(WatermarkUnavailable, match="Could not load the SilentCipher checkpoints") as info:
        Watermarker.load(str(tmp_path))
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("source", ["/nonexistent/silentcipher", "./no/such/dir", "~/no-such-sc-dir/"])
def test_nonexistent_local_path(source: str, offline_hub: list[object]) -> None:
    with pytest.raises(WatermarkUnavailable, match="does not exist"):
        resolve_silentcipher_dir(source)
    assert offline_hub == []


def test_invalid_source_string(offline_hub: list[object]) -> None:
    with pytest.raises(WatermarkUnavailable, match="neither an existing local directory nor a valid"):
        resolve_silentcipher_dir("not a repo id!")
    assert offline_hub == []


def test_repo_id_offline_without_cache(offline_hub: list[object]) -> None:
    with pytest.raises(WatermarkUnavailable) as info:
        Watermarker.load()  # default source: sony/silentcipher
    msg = str(info.value)
    assert "'sony/silentcipher'" in msg
    assert "hf download sony/silentcipher --include '44_1_khz/73999_iteration/*'" in msg
    assert "--no-watermark" in msg
    assert "watermark=False" in msg
    assert offline_hub == []


@pytest.mark.parametrize(
    "key", [(0, 0, 0, 0), (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 256), (0, 0, 0, 0, -1), (0.5, 0, 0, 0, 0), "abcde"]
)
def test_bad_key_is_value_error(key: object, sc_dir: Path) -> None:
    with pytest.raises(ValueError, match="watermark key"):
        Watermarker.load(sc_dir, key=key)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- apply / stream


def test_apply_preserves_length_dtype_and_marks(watermarker: Watermarker) -> None:
    x = speechlike(0.5)
    before = x.copy()
    y = watermarker.apply(x, SR)
    assert y.shape == x.shape
    assert y.dtype == np.float32
    np.testing.assert_array_equal(x, before)  # input not modified in place
    residual = y - x
    ratio = np.sqrt(np.mean(residual**2)) / np.sqrt(np.mean(x**2))
    assert np.all(np.isfinite(y))
    assert 0 < ratio < 0.1, ratio


def test_apply_float64_and_native_rate(watermarker: Watermarker) -> None:
    x = speechlike(0.1, sr=44100).astype(np.float64)
    y = watermarker.apply(x, 44100)
    assert y.shape == x.shape
    assert y.dtype == np.float64
    assert np.any(y != x)


@pytest.mark.parametrize("n", [1, 7, 480])
def test_apply_very_short(watermarker: Watermarker, n: int) -> None:
    x = speechlike(1.0)[1000 : 1000 + n]
    y = watermarker.apply(x, SR)
    assert y.shape == (n,)
    assert y.dtype == np.float32
    assert np.all(np.isfinite(y))


def test_apply_empty_and_silence(watermarker: Watermarker) -> None:
    assert watermarker.apply(np.zeros(0, np.float32), SR).shape == (0,)
    silence = np.zeros(2400, np.float32)
    out = watermarker.apply(silence, SR)
    np.testing.assert_array_equal(out, silence)


def test_apply_rejects_bad_input(watermarker: Watermarker) -> None:
    with pytest.raises(ValueError, match="mono 1-D"):
        watermarker.apply(np.zeros((2, 100), np.float32), SR)
    bad = speechlike(0.05)
    bad[10] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        watermarker.apply(bad, SR)
    with pytest.raises(ValueError, match="floating-point"):
        watermarker.apply(np.zeros(100, np.int16), SR)
    with pytest.raises(ValueError, match="sample_rate"):
        watermarker.apply(speechlike(0.05), 0)


def test_stream_preserves_total_length(watermarker: Watermarker) -> None:
    x = speechlike(0.9)
    sizes = [1920, 3840, 7680, x.shape[0] - 13440]  # 80 ms, 160 ms, 320 ms, rest: an engine-like ramp
    stream = StreamWatermarker(watermarker, SR)
    outs, start = [], 0
    for size in sizes:
        chunk = x[start : start + size]
        out = stream.process(chunk)
        assert out.shape == chunk.shape
        assert out.dtype == np.float32
        assert np.any(out != chunk)
        outs.append(out)
        start += size
    assert stream.samples_processed == x.shape[0]
    assert np.concatenate(outs).shape == x.shape


# --------------------------------------------------------------------------- detect / check_file


def test_detect_too_short(watermarker: Watermarker) -> None:
    res = watermarker.detect(speechlike(0.5), SR)
    assert res == WatermarkDetection(False, None, None, res.reason)
    assert res.reason.startswith("too short: needs at least 0.84 s")
    short44 = speechlike(1.0, sr=44100)[: MIN_DETECT_SAMPLES_44K - 1]
    assert watermarker.detect(short44, 44100).reason.startswith("too short")


def test_detect_silence(watermarker: Watermarker) -> None:
    res = watermarker.detect(np.zeros(SR, np.float32), SR)
    assert not res.detected
    assert res.reason.startswith("silent")


def _assert_well_formed(res: WatermarkDetection) -> None:
    assert isinstance(res, WatermarkDetection)
    assert isinstance(res.detected, bool)
    assert res.reason
    if res.message is not None:
        assert isinstance(res.message, tuple)
        assert all(isinstance(v, int) for v in res.message)
        assert res.confidence is not None
        assert 0.0 <= res.confidence <= 1.0
    if res.detected:
        assert res.message == DEFAULT_WATERMARK_KEY


def test_detect_runs_on_one_second(watermarker: Watermarker) -> None:
    marked = watermarker.apply(speechlike(1.0), SR)
    _assert_well_formed(watermarker.detect(marked, SR))


def test_check_file_stereo_wav(watermarker: Watermarker, tmp_path: Path) -> None:
    mono = speechlike(1.0, seed=3)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([mono, 0.5 * mono], axis=1), SR, subtype="PCM_16")
    _assert_well_formed(check_file(path, watermarker))
    sf.write(tmp_path / "short.flac", np.stack([mono[:2400]] * 2, axis=1), SR)
    assert check_file(tmp_path / "short.flac", watermarker).reason.startswith("too short")
    with pytest.raises(FileNotFoundError):
        check_file(tmp_path / "missing.wav", watermarker)


# --------------------------------------------------------------------------- logic with a stand-in model


class FakeModel:
    """Records calls; returns a configurable decode result; checks calls never overlap."""

    def __init__(self, decode_result: dict[str, object]) -> None:
        self.decode_result = decode_result
        self.calls: list[tuple[str, tuple[object, ...], dict[str, object]]] = []
        self.active = 0
        self.overlapped = False

    def _enter(self) -> None:
        self.active += 1
        self.overlapped |= self.active > 1
        time.sleep(0.002)
        self.active -= 1

    def encode_wav(self, y: np.ndarray, sr: int, message: list[int], **kw: object) -> tuple[np.ndarray, int]:
        self._enter()
        self.calls.append(("encode", (y, sr, message), kw))
        return y * 1.01, 0

    def decode_wav(self, y: np.ndarray, sr: int, phase_shift_decoding: bool) -> dict[str, object]:
        self._enter()
        self.calls.append(("decode", (y, sr), {"phase_shift_decoding": phase_shift_decoding}))
        return self.decode_result


def test_encode_arguments_match_reference() -> None:
    fake = FakeModel({})
    w = Watermarker(fake, key=(1, 2, 3, 4, 5))
    out = w.apply(speechlike(0.2), SR)
    assert out.shape == (4800,)
    (kind, (y, sr, message), kw) = fake.calls[0]
    assert kind == "encode"
    assert isinstance(y, np.ndarray)
    assert y.ndim == 1
    assert sr == 44100
    assert abs(y.shape[0] - 8820) <= 1
    assert message == [1, 2, 3, 4, 5]
    assert kw == {"message_sdr": 36, "calc_sdr": False, "disable_checks": True}


def test_detect_key_matching_and_failures() -> None:
    clip = speechlike(1.0)
    ours = Watermarker(FakeModel({"messages": [[0, 0, 0, 0, 0]], "confidences": [0.9], "status": True}))
    res = ours.detect(clip, SR, phase_shift=True)
    assert res == WatermarkDetection(True, (0, 0, 0, 0, 0), 0.9, res.reason)
    assert ours._model.calls[0][2] == {"phase_shift_decoding": True}

    other = Watermarker(FakeModel({"messages": [[9, 9, 9, 9, 9]], "confidences": [1.0], "status": True}))
    res = other.detect(clip, SR)
    assert not res.detected
    assert res.message == (9, 9, 9, 9, 9)
    assert "not our key" in res.reason

    none = Watermarker(
        FakeModel({"messages": [], "confidences": [], "error": "Could not find message", "status": False})
    )
    res = none.detect(clip, SR)
    assert res == WatermarkDetection(False, None, None, res.reason)
    assert "Could not find message" in res.reason


def test_calls_are_serialised_across_threads() -> None:
    fake = FakeModel({})
    w = Watermarker(fake)
    x = speechlike(0.05)
    threads = [threading.Thread(target=w.apply, args=(x, SR)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake.calls) == 6
    assert not fake.overlapped


def test_model_with_foreign_stft_is_rejected(tmp_path: Path) -> None:
    """silentcipher's STFT is a process-wide singleton; a 16 kHz model loaded first would leave it at
    n_fft=2048, which the 44.1 kHz checkpoint must not silently use."""
    from types import SimpleNamespace

    config = SimpleNamespace(SR=44100, message_len=21, n_messages=1, N_FFT=4096, HOP_LENGTH=2048)
    model = SimpleNamespace(config=config, stft=SimpleNamespace(filter_length=2048, hop_len=1024))
    with pytest.raises(WatermarkUnavailable, match="n_fft=2048"):
        wm._check_model(model, tmp_path)
    model.stft = SimpleNamespace(filter_length=4096, hop_len=2048)
    wm._check_model(model, tmp_path)

"""Tests for misotts_agents.model.watermark against a random-weight SilentCipher checkpoint (offline).

Random weights exercise everything but the decoded message: loading, file checks, shapes, lengths,
resampling, error handling and the streaming wrapper.  Logic that depends on what the decoder returns
(key matching, failure handling) is checked with a small stand-in model.
"""

from __future__ import annotations

import shutil
import socket
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from signals import speechlike

from misotts_agents.model import watermark as wm
from misotts_agents.model.silentcipher import DecodedMessage
from misotts_agents.model.silentcipher.stft import Spectrogram
from misotts_agents.model.watermark import (
    DEFAULT_WATERMARK_KEY,
    MIN_DETECT_SAMPLES_44K,
    WatermarkDetection,
    Watermarker,
    WatermarkUnavailable,
    check_file,
    resolve_silentcipher_dir,
)
from misotts_agents.model.watermark_stream import StreamWatermarker
from misotts_agents.testing.silentcipher import make_tiny_silentcipher

SR = 24000


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
    """Stands in for SilentCipher: records calls and returns a configurable decode result."""

    def __init__(self, decoded: DecodedMessage) -> None:
        self.decoded = decoded
        self.calls: list[tuple[str, tuple[object, ...], dict[str, object]]] = []
        self.spectrogram = Spectrogram(4096, 2048)
        self.device = torch.device("cpu")

    def embed(self, audio: torch.Tensor, message: tuple[int, ...], sdr: float = 36.0, **window: object) -> torch.Tensor:
        self.calls.append(("embed", (audio, message), {"sdr": sdr, **window}))
        return audio * 1.01

    def detect(self, audio: torch.Tensor, phase_shift: bool = False) -> DecodedMessage:
        self.calls.append(("detect", (audio,), {"phase_shift": phase_shift}))
        return self.decoded


def stand_in(decoded: DecodedMessage, key: tuple[int, ...] = DEFAULT_WATERMARK_KEY) -> tuple[Watermarker, FakeModel]:
    fake = FakeModel(decoded)
    return Watermarker(fake, key=key), fake  # type: ignore[arg-type]


def test_embed_arguments_match_reference() -> None:
    """44.1 kHz float64 audio (power scaling in float64, as silentcipher did with our float64 arrays),
    our key, and the reference's SDR 36."""
    w, fake = stand_in(DecodedMessage(None, None, "unused"), key=(1, 2, 3, 4, 5))
    out = w.apply(speechlike(0.2), SR)
    assert out.shape == (4800,)
    (kind, (y, message), kw) = fake.calls[0]
    assert kind == "embed"
    assert isinstance(y, torch.Tensor)
    assert y.dtype == torch.float64
    assert y.shape[0] == 1  # one clip: a batch of one row
    assert abs(y.shape[1] - 8820) <= 1
    assert message == (1, 2, 3, 4, 5)
    assert kw == {"sdr": 36, "phases": [0], "powers": None, "lengths": [y.shape[1]]}


def test_detect_key_matching_and_failures() -> None:
    clip = speechlike(1.0)
    ours, fake = stand_in(DecodedMessage((0, 0, 0, 0, 0), 0.9))
    res = ours.detect(clip, SR, phase_shift=True)
    assert res == WatermarkDetection(True, (0, 0, 0, 0, 0), 0.9, res.reason)
    assert fake.calls[0][2] == {"phase_shift": True}
    audio = fake.calls[0][1][0]
    assert isinstance(audio, torch.Tensor)
    assert audio.dtype == torch.float32

    other, _ = stand_in(DecodedMessage((9, 9, 9, 9, 9), 1.0))
    res = other.detect(clip, SR)
    assert not res.detected
    assert res.message == (9, 9, 9, 9, 9)
    assert "not our key" in res.reason

    none, _ = stand_in(DecodedMessage(None, None, "no end marker in the voted message window"))
    res = none.detect(clip, SR)
    assert res == WatermarkDetection(False, None, None, res.reason)
    assert "no end marker" in res.reason


def test_instances_are_independent_and_thread_safe(watermarker: Watermarker, sc_dir: Path) -> None:
    """Two watermarkers (different keys) used from two threads at once give exactly what they give one
    call at a time: there is no shared state left to lock."""
    other = Watermarker.load(sc_dir, key=(7, 7, 7, 7, 7))
    clips = [speechlike(seconds, seed=i) for i, seconds in enumerate((0.12, 0.3, 0.05, 0.2))]
    work = [(watermarker, clips), (other, clips[::-1])]
    sequential = [[w.apply(clip, SR) for clip in batch] for w, batch in work]
    concurrent: list[list[np.ndarray]] = [[], []]
    start = threading.Barrier(2)

    def run(index: int) -> None:
        w, batch = work[index]
        start.wait()
        concurrent[index] = [w.apply(clip, SR) for clip in batch]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, expected in zip(concurrent, sequential, strict=True):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(sequential[0][0], sequential[1][-1])  # the keys do make a difference


def test_model_with_other_framing_is_rejected(tmp_path: Path) -> None:
    """The model runs any N_FFT/HOP_LENGTH, but the watermarker's 44.1 kHz resampling and detection
    minimum assume the 44.1 kHz model's 4096/2048."""
    from misotts_agents.model.silentcipher import SilentCipherConfig

    config = SilentCipherConfig(
        sample_rate=44100,
        n_fft=2048,
        hop_length=1024,
        message_band_size=1024,
        enc_n_layers=3,
        dec_c_n_layers=4,
        message_sdr=47.0,
    )
    with pytest.raises(WatermarkUnavailable, match="N_FFT/HOP_LENGTH are 2048/1024"):
        wm._check_config(config, tmp_path)
    with pytest.raises(WatermarkUnavailable, match="SR is 16000"):
        wm._check_config(replace(config, sample_rate=16000, n_fft=4096, hop_length=2048), tmp_path)
    wm._check_config(replace(config, n_fft=4096, hop_length=2048), tmp_path)


def test_apply_batch_marks_each_clip_as_apply_alone(watermarker):
    rng = np.random.default_rng(5)
    clips = [
        (rng.standard_normal(1920) * 0.1).astype(np.float32),
        (rng.standard_normal(1920) * 0.2).astype(np.float32),
        np.zeros(1920, dtype=np.float32),  # silent: unchanged, and no harm to its neighbours
        (rng.standard_normal(4000) * 0.1).astype(np.float32),  # another length: its own call
        np.zeros(0, dtype=np.float32),
    ]
    batched = watermarker.apply_batch(clips)
    assert [b.shape for b in batched] == [c.shape for c in clips]
    for clip, got in zip(clips, batched, strict=True):
        np.testing.assert_allclose(got, watermarker.apply(clip), atol=1e-6)
    assert np.array_equal(batched[2], clips[2])
    assert not np.array_equal(batched[0], clips[0])

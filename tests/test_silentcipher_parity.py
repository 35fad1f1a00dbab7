"""Our SilentCipher port (misotts_agents.model.silentcipher) against silentcipher 1.0.5 itself.

Both load the same random-weight checkpoint directories written by ``make_tiny_silentcipher``: the
real 44.1 kHz architecture and hparams, and a copy whose message band is 2 bins instead of 1024 so
the message decoder is cheap enough for multi-window and phase-shift decoding on one thread (the code
paths are the same; only the band width differs).  With random weights the decoded messages are garbage, but
they must be the *same* garbage; the clips below were picked (by seed) so that some decodes succeed,
one with a negative "byte" (a repeated end marker read as "-1"), and some fail.  If the tiny maker's
weights change, those seeds have to be picked again (the success assertions say so).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from misotts_agents.errors import CheckpointError, ModelSourceError
from misotts_agents.model.silentcipher import DecodedMessage, SilentCipher
from misotts_agents.model.watermark import Watermarker, WatermarkUnavailable
from misotts_agents.testing.silentcipher import CHECKPOINT_FILES, make_tiny_silentcipher

TOLERANCE = 1e-5
KEY = (0, 0, 0, 0, 0)
OTHER_KEY = (255, 0, 128, 7, 9)  # first byte 255: symbols 3,3,3,3, so even 3-frame clips differ from KEY


def speechlike(n: int, seed: int = 0) -> np.ndarray:
    """float64 harmonics of a gliding fundamental with a little noise, at 44.1 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 44100
    phase = 2 * np.pi * np.cumsum(140.0 + 20.0 * np.sin(2 * np.pi * 0.7 * t)) / 44100
    sig = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.6 + 0.4 * np.sin(2 * np.pi * 3.0 * t)) * 0.2
    return sig + 0.005 * rng.standard_normal(n)


def noise(n: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def package_model(directory: Path) -> Any:
    """silentcipher's own model over ``directory`` (its import warns about ffmpeg; that is irrelevant)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        silentcipher = pytest.importorskip("silentcipher")
    return silentcipher.get_model(
        model_type="44.1k", ckpt_path=str(directory), config_path=str(directory / "hparams.yaml"), device="cpu"
    )


def as_package_result(result: DecodedMessage) -> dict[str, object]:
    """Our result in the shape of the package's ``decode_wav`` dict, to compare them whole."""
    if result.message is None:
        return {"messages": [], "confidences": [], "error": "Could not find message", "status": False}
    return {"messages": [list(result.message)], "confidences": [result.confidence], "status": True}


@pytest.fixture(scope="module")
def sc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_silentcipher(tmp_path_factory.mktemp("sc") / "73999_iteration", seed=0)


@pytest.fixture(scope="module")
def narrow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_silentcipher(tmp_path_factory.mktemp("sc-narrow"), seed=2, overrides={"message_band_size": 2})


@pytest.fixture(scope="module")
def narrow_pair(narrow_dir: Path) -> tuple[Any, SilentCipher]:
    """The package's model and ours over the narrow-band checkpoint."""
    return package_model(narrow_dir), SilentCipher.load(narrow_dir)


@pytest.fixture(scope="module")
def theirs(sc_dir: Path) -> Any:
    return package_model(sc_dir)


@pytest.fixture(scope="module")
def ours(sc_dir: Path) -> SilentCipher:
    return SilentCipher.load(sc_dir)


# --------------------------------------------------------------------------- checkpoint format


def test_package_loads_what_the_maker_writes(theirs: Any, ours: SilentCipher) -> None:
    """get_model (whose load_models uses strict load_state_dict) accepted the files; the tensors it
    holds are the ones we loaded, key for key."""
    pairs = [
        (theirs.enc_c, ours.encoder),
        (theirs.dec_c, ours.carrier_decoder),
        (theirs.dec_m[0], ours.message_decoder),
    ]
    for package_net, our_net in pairs:
        expected, got = package_net.state_dict(), our_net.state_dict()
        assert list(expected) == list(got)
        for key, tensor in expected.items():
            assert torch.equal(tensor, got[key]), key


# --------------------------------------------------------------------------- embedding


@pytest.mark.parametrize(
    ("length", "key"),
    [
        (3000, KEY),  # shorter than one FFT: 3 frames
        (3000, OTHER_KEY),
        (7 * 4096, KEY),  # a multiple of 4096: the package still pads a whole 4096
        (44100, KEY),  # ~1 s
        (132301, OTHER_KEY),  # ~3 s, several message windows
    ],
)
def test_embed_matches_package(theirs: Any, ours: SilentCipher, length: int, key: tuple[int, ...]) -> None:
    y = speechlike(length, seed=length)
    expected, _ = theirs.encode_wav(y.copy(), 44100, list(key), message_sdr=36, calc_sdr=False, disable_checks=True)
    got = ours.embed(torch.from_numpy(y), key, sdr=36).numpy()
    assert got.dtype == np.float64
    assert got.shape == expected.shape == (length,)
    assert np.max(np.abs(got - expected)) <= TOLERANCE
    assert np.max(np.abs(got - y)) > 1e-3  # there is a mark to compare


def test_batched_embed_equals_rows_alone(ours: SilentCipher) -> None:
    rows = torch.from_numpy(np.stack([speechlike(11025, seed=s) * (0.3 + s) for s in range(3)]))
    before = {k: v.clone() for k, v in ours.carrier_decoder.state_dict().items()}
    batched = ours.embed(rows, KEY)
    assert batched.shape == rows.shape
    for i in range(rows.shape[0]):
        alone = ours.embed(rows[i], KEY)
        assert torch.max(torch.abs(batched[i] - alone)) <= TOLERANCE
    # The normalisation layers never touch their running statistics.
    assert all(torch.equal(v, before[k]) for k, v in ours.carrier_decoder.state_dict().items())


def test_silent_row_next_to_a_loud_one(ours: SilentCipher) -> None:
    loud = torch.from_numpy(speechlike(5000, seed=1).astype(np.float32))
    batch = torch.stack([loud, torch.zeros_like(loud)])
    out = ours.embed(batch, KEY)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], batch[1])
    assert torch.max(torch.abs(out[0] - ours.embed(loud, KEY))) <= TOLERANCE
    assert ours.embed(torch.zeros(0), KEY).shape == (0,)


def test_embed_rejects_bad_messages(ours: SilentCipher) -> None:
    for message in [(0, 0, 0, 0), (0, 0, 0, 0, 256), (-1, 0, 0, 0, 0)]:
        with pytest.raises(ValueError, match=r"5 ints in 0\.\.255"):
            ours.embed(torch.ones(100), message)


# --------------------------------------------------------------------------- detection


def test_detect_matches_package(theirs: Any, ours: SilentCipher) -> None:
    """The real architecture on a clip its random decoder reads as a message (failures: below)."""
    clip = noise(38000, seed=26)
    expected = theirs.decode_wav(clip, 44100, False)
    assert expected["status"], "pick another seed: the package decodes no message from this clip"
    assert as_package_result(ours.detect(torch.from_numpy(clip))) == expected


def test_marked_by_one_detected_by_both(narrow_pair: tuple[Any, SilentCipher]) -> None:
    theirs, ours = narrow_pair
    y = speechlike(37000, seed=5)
    marked_ours = ours.embed(torch.from_numpy(y), KEY).numpy().astype(np.float32)
    marked_theirs, _ = theirs.encode_wav(
        y.copy(), 44100, list(KEY), message_sdr=36, calc_sdr=False, disable_checks=True
    )
    marked_theirs = marked_theirs.astype(np.float32)
    for clip in (marked_ours, marked_theirs):
        by_them = theirs.decode_wav(clip, 44100, False)
        assert as_package_result(ours.detect(torch.from_numpy(clip))) == by_them


def test_multi_window_confidence_matches_package(narrow_pair: tuple[Any, SilentCipher]) -> None:
    """Seven windows: a confidence below 1 and a negative byte from a repeated end marker."""
    theirs, ours = narrow_pair
    clip = noise(150000, seed=28)
    expected = theirs.decode_wav(clip, 44100, False)
    assert expected["status"], "pick another seed: the package decodes no message from this clip"
    assert min(expected["messages"][0]) < 0
    assert expected["confidences"][0] < 1
    assert as_package_result(ours.detect(torch.from_numpy(clip))) == expected


def test_phase_shift_decoding_matches_package(narrow_pair: tuple[Any, SilentCipher]) -> None:
    """A clip where the best shift is not 0 (450 samples): without the search nothing is decoded."""
    theirs, ours = narrow_pair
    clip = noise(85000, seed=3)
    expected = theirs.decode_wav(clip, 44100, True)
    assert expected["status"], "pick another seed: the package decodes no message from this clip"
    assert as_package_result(ours.detect(torch.from_numpy(clip), phase_shift=True)) == expected
    assert not ours.detect(torch.from_numpy(clip)).found


class FixedLogits(nn.Module):
    """A message decoder that ignores its input and returns given logits (1, 5, frames)."""

    def __init__(self, logits: torch.Tensor, package_shape: bool) -> None:
        super().__init__()
        self.logits = logits
        self.package_shape = package_shape

    def forward(self, carrier: torch.Tensor) -> torch.Tensor:
        return self.logits[None] if self.package_shape else self.logits


def test_decoding_rules_match_package(monkeypatch: pytest.MonkeyPatch, narrow_pair: tuple[Any, SilentCipher]) -> None:
    """Voting (ties to the smallest class), end marker, rotation, confidence and the byte parsing,
    over many frame patterns: both decoders are fed the same logits."""
    theirs, ours = narrow_pair
    rng = np.random.default_rng(0)
    outcomes = set()
    for trial in range(160):
        k = (11, 21, 32, 43)[trial % 4]  # 4096 k - 100 samples: 2 k + 1 frames, 1 to 4 whole windows
        clip = noise(4096 * k - 100, seed=trial)
        frames = 2 * k + 1
        window = rng.integers(1, 5, size=21)
        window[rng.integers(21)] = 0
        classes = np.tile(window, frames // 21 + 1)[:frames]
        flips = rng.random(frames) < rng.choice([0.05, 0.3, 0.7])
        classes[flips] = rng.integers(0, 5, size=int(flips.sum()))
        logits = torch.from_numpy(rng.normal(0, 0.1, size=(5, frames)).astype(np.float32))
        logits[classes, np.arange(frames)] += 1.0
        monkeypatch.setattr(theirs, "dec_m", [FixedLogits(logits[None], package_shape=True)])
        expected = theirs.decode_wav(clip, 44100, False)
        fake = SilentCipher(ours.config, ours.encoder, ours.carrier_decoder, FixedLogits(logits[None], False))  # type: ignore[arg-type]
        got = fake.detect(torch.from_numpy(clip))
        assert as_package_result(got) == expected, trial
        outcomes.add((got.found, got.confidence == 1.0 if got.found else None))
    assert outcomes == {(False, None), (True, True), (True, False)}


# --------------------------------------------------------------------------- loading errors


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("hparams.yaml", *CHECKPOINT_FILES):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_missing_checkpoint_key_is_named(sc_dir: Path, tmp_path: Path) -> None:
    bad = _copy(sc_dir, tmp_path / "bad")
    state = torch.load(bad / "enc_c.ckpt", weights_only=True)
    del state["main.1.gate.bias"]
    torch.save(state, bad / "enc_c.ckpt")
    with pytest.raises(CheckpointError, match=r"enc_c\.ckpt.*missing key main\.1\.gate\.bias"):
        SilentCipher.load(bad)
    with pytest.raises(WatermarkUnavailable, match=r"enc_c\.ckpt.*main\.1\.gate\.bias"):
        Watermarker.load(bad)


def test_wrong_shape_and_unexpected_key_are_named(sc_dir: Path, tmp_path: Path) -> None:
    bad = _copy(sc_dir, tmp_path / "bad")
    state = torch.load(bad / "dec_m_0.ckpt", weights_only=True)
    state["linear.weight"] = torch.zeros(1, 512)
    torch.save(state, bad / "dec_m_0.ckpt")
    with pytest.raises(WatermarkUnavailable, match=r"dec_m_0\.ckpt: linear\.weight has shape \(1, 512\)"):
        Watermarker.load(bad)
    state = torch.load(sc_dir / "dec_c.ckpt", weights_only=True)
    torch.save({**state, "main.9.conv.weight": torch.zeros(1)}, bad / "dec_c.ckpt")
    with pytest.raises(CheckpointError, match=r"dec_c\.ckpt.*unexpected key main\.9\.conv\.weight"):
        SilentCipher.load(bad)


def test_data_parallel_prefix_is_accepted(sc_dir: Path, tmp_path: Path, ours: SilentCipher) -> None:
    prefixed = _copy(sc_dir, tmp_path / "prefixed")
    state = torch.load(prefixed / "enc_c.ckpt", weights_only=True)
    torch.save({f"module.{k}": v for k, v in state.items()}, prefixed / "enc_c.ckpt")
    loaded = SilentCipher.load(prefixed)
    assert all(torch.equal(v, ours.encoder.state_dict()[k]) for k, v in loaded.encoder.state_dict().items())


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda text: text.replace("message_band_size: 1024\n", ""), "message_band_size"),
        (lambda text: text.replace("SR: 44100", "SR: 16000"), "SR is 16000"),
        (lambda text: text.replace("message_len: 21", "message_len: 11"), "message_len is 11"),
        (lambda text: text.replace("ensure_negative_message: true", "ensure_negative_message: false"), "ensure_neg"),
        (lambda text: text + "  - not: [valid yaml\n", "not valid YAML"),
    ],
)
def test_bad_hparams_are_named(sc_dir: Path, tmp_path: Path, edit: Any, match: str) -> None:
    bad = _copy(sc_dir, tmp_path / "bad")
    (bad / "hparams.yaml").write_text(edit((bad / "hparams.yaml").read_text()))
    with pytest.raises(WatermarkUnavailable, match=match):
        Watermarker.load(bad)


def test_missing_file_is_named(sc_dir: Path, tmp_path: Path) -> None:
    bad = _copy(sc_dir, tmp_path / "bad")
    (bad / "dec_c.ckpt").unlink()
    with pytest.raises(ModelSourceError, match=r"dec_c\.ckpt does not exist"):
        SilentCipher.load(bad)
    with pytest.raises(WatermarkUnavailable, match=r"dec_c\.ckpt"):
        Watermarker.load(bad)

"""Inaudible SilentCipher watermark for generated speech (framework-free): the reference's key and
strength, so its detector recognises our audio; each streamed chunk marked as it leaves (no added
latency, weaker marks on short chunks); one process-wide lock around silentcipher, which is not
thread-safe; silentcipher imported lazily. Why each of these, with measurements: docs/watermark.md.
"""

from __future__ import annotations

import operator
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from misotts_agents.audio import SAMPLE_RATE, check_mono_float
from misotts_agents.errors import ModelSourceError

__all__ = [
    "DEFAULT_WATERMARK_KEY",
    "DEFAULT_WATERMARK_SOURCE",
    "MIN_DETECT_SAMPLES_44K",
    "MIN_DETECT_SECONDS",
    "REQUIRED_FILES",
    "SILENTCIPHER_SUBDIR",
    "WATERMARK_MESSAGE_SDR",
    "WATERMARK_SAMPLE_RATE",
    "StreamWatermarker",
    "WatermarkDetection",
    "WatermarkUnavailable",
    "Watermarker",
    "check_file",
    "resolve_silentcipher_dir",
]

#: SilentCipher's 44.1k model only works at this rate; audio is resampled to it and back.
WATERMARK_SAMPLE_RATE = 44100

#: The MisoTTS reference's public key.  Using it means the reference detector recognises our audio.
DEFAULT_WATERMARK_KEY: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)

#: Hugging Face repo holding the published SilentCipher weights.
DEFAULT_WATERMARK_SOURCE = "sony/silentcipher"

#: Message-to-signal ratio in dB.  The reference uses 36 (the checkpoint's hparams default is 47,
#: i.e. weaker); we match the reference so strength and audibility are the same.
WATERMARK_MESSAGE_SDR = 36

#: Where the 44.1 kHz checkpoint lives inside the ``sony/silentcipher`` repo.
SILENTCIPHER_SUBDIR = "44_1_khz/73999_iteration"
# A model directory may carry its SilentCipher weights in this subdirectory (make-tiny writes one).
MODEL_DIR_SUBDIR = "silentcipher"

#: Files ``silentcipher.get_model`` / ``Model.load_models`` read for the 44.1k model with one message.
#: ``dec_m_0.ckpt`` is only used for detection, but ``load_models`` loads it unconditionally.
REQUIRED_FILES: tuple[str, ...] = ("hparams.yaml", "enc_c.ckpt", "dec_c.ckpt", "dec_m_0.ckpt")

#: Shortest 44.1 kHz input that yields one whole 21-frame message window.  The STFT zero-pads the
#: input to the next multiple of N_FFT=4096 (always adding at least one sample) and, with center=True,
#: yields 1 + padded/2048 frames; 21 frames need padded >= 40960, i.e. at least 9 * 4096 input samples.
#: Anything shorter makes ``decode_wav`` fail inside its own try/except.
MIN_DETECT_SAMPLES_44K = 9 * 4096  # 36,864 samples
MIN_DETECT_SECONDS = MIN_DETECT_SAMPLES_44K / WATERMARK_SAMPLE_RATE  # ~0.836 s

# Below this mean power (RMS 1e-6, -120 dBFS) a clip is treated as silence and left untouched:
# silentcipher normalises by the clip's power and would divide by (nearly) zero, producing NaN, and a
# mark 36 dB under -120 dBFS would be below 24-bit quantisation anyway.
_SILENCE_POWER = 1e-12

# `hf` is huggingface_hub's CLI since 1.0 (the old `huggingface-cli` entry point is gone there).
_HOW_TO_PROVIDE = (
    "Pass a local directory with " + ", ".join(REQUIRED_FILES) + " (or one containing "
    f"{SILENTCIPHER_SUBDIR}/ with them), download {DEFAULT_WATERMARK_SOURCE} with "
    f"`hf download {DEFAULT_WATERMARK_SOURCE} --include '{SILENTCIPHER_SUBDIR}/*'` (then it is found in "
    "the Hugging Face cache, also with HF_HUB_OFFLINE=1), or disable watermarking explicitly with "
    "--no-watermark / watermark=False."
)

# One lock for all SilentCipher calls in the process: its STFT module is a process-wide singleton
# (see docs/watermark.md), so per-instance locks would not be enough.
_SILENTCIPHER_LOCK = threading.Lock()


class WatermarkUnavailable(ModelSourceError, RuntimeError):
    """The SilentCipher weights (or the package) cannot be loaded.

    A distinct type so callers can tell "watermarking was requested but cannot be done" apart from
    other errors and show the message, which always says what is missing and how to fix it.
    """


@dataclass(frozen=True)
class WatermarkDetection:
    """Result of :meth:`Watermarker.detect`.

    ``detected`` is True only when SilentCipher decoded a message *and* it equals the watermarker's
    key.  ``message`` is whatever was decoded (possibly someone else's key), ``confidence`` is
    silentcipher's agreement score: the fraction of (window, symbol) positions that agree with the
    majority vote.  With a single window it is trivially 1.0, so it only means something on clips that
    span several windows (a few seconds).  ``reason`` explains the outcome in words.
    """

    detected: bool
    message: tuple[int, ...] | None
    confidence: float | None
    reason: str


def _validate_key(key: Sequence[int]) -> tuple[int, int, int, int, int]:
    """Return ``key`` as a 5-tuple of ints in 0..255 or raise ``ValueError``.

    SilentCipher carries exactly 40 bits (five bytes); anything else would fail deep inside
    ``letters_encoding`` with a bare ``assert``.  Wrong types raise ``ValueError`` too, so callers
    (CLI flags, config files) have one exception type to turn into a usage error.
    """
    if isinstance(key, (str, bytes)) or not isinstance(key, Sequence):
        raise ValueError(f"watermark key must be a sequence of 5 ints in 0..255, got {key!r}")
    if len(key) != 5:
        raise ValueError(f"watermark key must have exactly 5 values (40 bits), got {len(key)}: {key!r}")
    values = []
    for value in key:
        if isinstance(value, bool):
            raise ValueError(f"watermark key values must be ints in 0..255, got {value!r} in {key!r}")
        try:
            as_int = operator.index(value)
        except TypeError:
            raise ValueError(f"watermark key values must be ints in 0..255, got {value!r} in {key!r}") from None
        if not 0 <= as_int <= 255:
            raise ValueError(f"watermark key values must be in 0..255, got {as_int} in {key!r}")
        values.append(as_int)
    return (values[0], values[1], values[2], values[3], values[4])


def _missing_files(directory: Path) -> list[str]:
    return [name for name in REQUIRED_FILES if not (directory / name).is_file()]


def _check_checkpoint_dir(path: Path, origin: str) -> Path:
    """Return the directory holding the checkpoint files: ``path`` or ``path/44_1_khz/73999_iteration``."""
    if not path.exists():
        raise WatermarkUnavailable(f"SilentCipher directory {path} ({origin}) does not exist. {_HOW_TO_PROVIDE}")
    if not path.is_dir():
        raise WatermarkUnavailable(f"SilentCipher source {path} ({origin}) is not a directory. {_HOW_TO_PROVIDE}")
    missing = _missing_files(path)
    if not missing:
        return path
    nested = path / SILENTCIPHER_SUBDIR
    if nested.is_dir():
        path, missing = nested, _missing_files(nested)
        if not missing:
            return nested
    raise WatermarkUnavailable(
        f"SilentCipher directory {path} ({origin}) is missing {', '.join(missing)}. {_HOW_TO_PROVIDE}"
    )


def _looks_like_path(source: str) -> bool:
    """Strings that are clearly meant as file-system paths, never as a Hugging Face repo id."""
    return source.startswith((".", "/", "~")) or "\\" in source or source.endswith("/")


def resolve_silentcipher_dir(source: str | Path) -> Path:
    """Find the directory with the SilentCipher 44.1 kHz checkpoint files.

    ``source`` is, in order of preference:

    * an existing local directory holding :data:`REQUIRED_FILES`, or one containing
      ``44_1_khz/73999_iteration/`` with them (the layout of the Hugging Face repo), used as is;
    * a Hugging Face repo id such as ``"sony/silentcipher"``, fetched with
      ``huggingface_hub.snapshot_download`` restricted to the 44.1 kHz files (so the unused 16 kHz
      model and optimiser state are not downloaded).  Cache, progress bar, ``HF_HUB_OFFLINE``,
      ``HF_TOKEN`` etc. are huggingface_hub's own.

    We resolve the directory ourselves rather than letting ``silentcipher.get_model`` do it, because
    ``get_model`` silently falls back to downloading the whole repo whenever a path is wrong, which turns
    a typo into a surprise network access.  Every failure raises :class:`WatermarkUnavailable`.
    """
    if isinstance(source, Path):
        return _check_checkpoint_dir(source.expanduser(), "local path")
    if not isinstance(source, str) or not source:
        raise WatermarkUnavailable(
            f"SilentCipher source must be a directory or a repo id, got {source!r}. {_HOW_TO_PROVIDE}"
        )
    local = Path(source).expanduser()
    if local.exists() or _looks_like_path(source):
        return _check_checkpoint_dir(local, "local path")

    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise WatermarkUnavailable(
            f"SilentCipher source {source!r} is neither an existing local directory nor a valid Hugging "
            f"Face repo id. {_HOW_TO_PROVIDE}"
        ) from None
    try:
        snapshot = snapshot_download(repo_id=source, allow_patterns=[f"{SILENTCIPHER_SUBDIR}/*"])
    except Exception as exc:  # network, auth, offline-without-cache: all mean "not available"
        raise WatermarkUnavailable(
            f"Could not get the SilentCipher weights from the Hugging Face repo {source!r} "
            f"({type(exc).__name__}: {exc}). {_HOW_TO_PROVIDE}"
        ) from exc
    return _check_checkpoint_dir(Path(snapshot) / SILENTCIPHER_SUBDIR, f"snapshot of {source}")


def _check_rate(sample_rate: int) -> int:
    try:
        rate = operator.index(sample_rate)
    except TypeError:
        raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}") from None
    if rate <= 0:
        raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
    return rate


def _resample(signal: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    if src_rate == dst_rate or signal.size == 0:
        return signal
    import soxr

    return soxr.resample(signal, src_rate, dst_rate, quality="HQ")


def _fit_length(signal: np.ndarray, length: int) -> np.ndarray:
    """Trim or zero-pad: resampling round trips can be off by a sample or two."""
    if signal.shape[0] >= length:
        return signal[:length]
    return np.pad(signal, (0, length - signal.shape[0]))


class Watermarker:
    """Embeds and detects a 5-byte SilentCipher message (44.1 kHz model) in mono audio.

    Build it with :meth:`load`.  Calls are serialised by a process-wide lock (silentcipher is not
    thread-safe), so one instance may be shared by several sessions; the encode compute is the
    bottleneck either way.
    """

    def __init__(
        self,
        model: Any,
        *,
        key: Sequence[int] = DEFAULT_WATERMARK_KEY,
        source_dir: Path | None = None,
    ) -> None:
        """Wrap an already loaded ``silentcipher.server.Model``; prefer :meth:`load`."""
        self._model = model
        self._key = _validate_key(key)
        self._source_dir = source_dir

    @classmethod
    def load(
        cls,
        source: str | Path = DEFAULT_WATERMARK_SOURCE,
        device: str = "cpu",
        key: Sequence[int] = DEFAULT_WATERMARK_KEY,
    ) -> Watermarker:
        """Load the SilentCipher 44.1 kHz model from ``source`` (see :func:`resolve_silentcipher_dir`).

        The key is validated first so a bad key fails fast, before any download or model load.
        Raises :class:`WatermarkUnavailable` if the weights cannot be found or loaded (missing or
        corrupt checkpoint, wrong hparams), ``ValueError`` for a bad key.
        """
        valid_key = _validate_key(key)
        ckpt_dir = resolve_silentcipher_dir(source)
        try:
            with warnings.catch_warnings():
                # pydub (imported by silentcipher, never used here: we pass arrays, not files)
                # warns at import time when ffmpeg is not installed.
                warnings.filterwarnings("ignore", message="Couldn't find ffmpeg or avconv")
                import silentcipher
        except ImportError as exc:
            raise WatermarkUnavailable(
                f"The silentcipher package cannot be imported ({exc}); install it with "
                "`pip install --no-deps silentcipher==1.0.5` (its torch<=2.0 pin is stale), or disable "
                "watermarking explicitly with --no-watermark / watermark=False."
            ) from exc
        with _SILENTCIPHER_LOCK:
            try:
                model = silentcipher.get_model(
                    model_type="44.1k",
                    ckpt_path=str(ckpt_dir),
                    config_path=str(ckpt_dir / "hparams.yaml"),
                    device=device,
                )
            except Exception as exc:  # corrupt/mismatched checkpoint, bad yaml, missing hparams key, device
                raise WatermarkUnavailable(
                    f"Could not load the SilentCipher checkpoints in {ckpt_dir} "
                    f"({type(exc).__name__}: {exc}). {_HOW_TO_PROVIDE}"
                ) from exc
        _check_model(model, ckpt_dir)
        return cls(model, key=valid_key, source_dir=ckpt_dir)

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        """The 5-byte message embedded by :meth:`apply` and looked for by :meth:`detect`."""
        return self._key

    @property
    def source_dir(self) -> Path | None:
        """Directory the checkpoints were loaded from (None when built from a model object)."""
        return self._source_dir

    def apply(self, audio: npt.ArrayLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """Return ``audio`` with the watermark embedded: same length, rate and dtype.

        ``audio`` is mono floating-point (1-D).  Empty input returns an empty copy; (near-)silent
        input is returned unchanged, because there is no signal to hide a message in and silentcipher
        would divide by its zero power.  Any length works; very short inputs get a weak mark (see
        docs/watermark.md).
        """
        x = check_mono_float(audio)
        rate = _check_rate(sample_rate)
        if x.size == 0:
            return x.copy()
        x64 = x.astype(np.float64)
        y44 = _resample(x64, rate, WATERMARK_SAMPLE_RATE)
        if float(np.mean(np.square(y44))) < _SILENCE_POWER:
            return x.copy()
        with _SILENTCIPHER_LOCK:
            # silentcipher 1.0.5 needs numpy input (it calls .copy() on it; a torch tensor fails).
            # calc_sdr=False skips a pass we do not use; disable_checks=True stops it from returning the
            # input unchanged with a print() on silence, which we handle above.
            marked44, _ = self._model.encode_wav(
                y44,
                WATERMARK_SAMPLE_RATE,
                list(self._key),
                message_sdr=WATERMARK_MESSAGE_SDR,
                calc_sdr=False,
                disable_checks=True,
            )
        residual44 = np.asarray(marked44, dtype=np.float64) - y44
        residual = _fit_length(_resample(residual44, WATERMARK_SAMPLE_RATE, rate), x.shape[0])
        return (x64 + residual).astype(x.dtype, copy=False)

    def detect(self, audio: npt.ArrayLike, sample_rate: int, *, phase_shift: bool = False) -> WatermarkDetection:
        """Decode the SilentCipher message in ``audio`` and compare it with our key.

        Never raises for clips that are merely too short or silent; the result says why nothing was
        found.  ``phase_shift=True`` is what the MisoTTS reference verifier uses: it searches 205
        sample offsets for the best frame alignment, which makes it robust to audio that was cut at an
        arbitrary point, but runs the message decoder once per offset over the whole clip, i.e.
        minutes on CPU.  The default (False) assumes the clip starts where the mark started, which
        holds for files written by this package.
        """
        x = check_mono_float(audio)
        rate = _check_rate(sample_rate)
        y44 = _resample(x.astype(np.float32, copy=False), rate, WATERMARK_SAMPLE_RATE)
        if y44.shape[0] < MIN_DETECT_SAMPLES_44K:
            return WatermarkDetection(
                detected=False,
                message=None,
                confidence=None,
                reason=(
                    f"too short: needs at least {MIN_DETECT_SECONDS:.2f} s (one full SilentCipher message "
                    f"window), got {x.shape[0] / rate:.2f} s"
                ),
            )
        if float(np.mean(np.square(y44, dtype=np.float64))) < _SILENCE_POWER:
            return WatermarkDetection(False, None, None, "silent: no signal to carry a watermark")
        with _SILENTCIPHER_LOCK:
            result = self._model.decode_wav(y44, WATERMARK_SAMPLE_RATE, phase_shift_decoding=phase_shift)
        if not result.get("status") or not result.get("messages"):
            why = result.get("error", "decoder returned no message")
            return WatermarkDetection(False, None, None, f"no SilentCipher message found ({why})")
        message = tuple(int(v) for v in result["messages"][0])
        first = (result.get("confidences") or [None])[0]
        confidence = None if first is None else float(first)
        if message == self._key:
            return WatermarkDetection(True, message, confidence, "SilentCipher message matches our key")
        return WatermarkDetection(
            False,
            message,
            confidence,
            f"SilentCipher message {list(message)} is not our key {list(self._key)}",
        )


def _check_model(model: Any, ckpt_dir: Path) -> None:
    """Reject a model that loaded but cannot carry our message correctly.

    silentcipher's ``STFT`` is a singleton created with the first model's FFT size; if a 16 kHz model
    (N_FFT 2048) was built earlier in the process, the 44.1 kHz model silently reuses the wrong STFT.
    A non-44.1 kHz or non-5-byte config would fail later with a bare assert or wrong audio.
    """
    config = model.config
    problems = []
    if int(config.SR) != WATERMARK_SAMPLE_RATE:
        problems.append(f"SR is {config.SR}, expected {WATERMARK_SAMPLE_RATE}")
    if int(config.message_len) != 21 or int(config.n_messages) < 1:
        problems.append("expected message_len 21 (5-byte messages) and n_messages >= 1")
    stft = model.stft
    if stft.filter_length != int(config.N_FFT) or stft.hop_len != int(config.HOP_LENGTH):
        problems.append(
            f"silentcipher's process-wide STFT was created with n_fft={stft.filter_length}, "
            f"hop={stft.hop_len} (another SilentCipher model was loaded first in this process), "
            f"but the checkpoint needs n_fft={config.N_FFT}, hop={config.HOP_LENGTH}"
        )
    if problems:
        raise WatermarkUnavailable(
            f"The SilentCipher model in {ckpt_dir} is not usable: {'; '.join(problems)}. {_HOW_TO_PROVIDE}"
        )


class StreamWatermarker:
    """Watermarks one utterance's audio chunk by chunk, as it is emitted.

    Each chunk is marked on its own and returned immediately (nothing is held back), trading some
    watermark strength on short early chunks for zero added time-to-first-audio; see the module
    docstring for the measurements behind that choice.  Errors from :meth:`Watermarker.apply`
    propagate: emitting unmarked audio while claiming to watermark is the caller's decision to make,
    not this class's.
    """

    def __init__(self, watermarker: Watermarker, sample_rate: int = SAMPLE_RATE) -> None:
        self._watermarker = watermarker
        self._sample_rate = _check_rate(sample_rate)
        self._samples = 0

    @property
    def sample_rate(self) -> int:
        return self._sample_rate

    @property
    def samples_processed(self) -> int:
        """Total samples returned so far for this utterance."""
        return self._samples

    def process(self, chunk: npt.ArrayLike) -> np.ndarray:
        """Return ``chunk`` watermarked, same length and dtype."""
        out = self._watermarker.apply(chunk, self._sample_rate)
        self._samples += out.shape[0]
        return out


def check_file(path: str | Path, watermarker: Watermarker, *, phase_shift: bool = False) -> WatermarkDetection:
    """Detect our watermark in an audio file (anything libsndfile reads: WAV, FLAC, OGG...).

    Multi-channel files are averaged to mono: audio we write is mono, and a mono mark copied to
    several channels survives averaging unchanged.
    """
    import soundfile as sf

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"no such audio file: {file}")
    data, rate = sf.read(str(file), dtype="float32", always_2d=True)
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    return watermarker.detect(mono, int(rate), phase_shift=phase_shift)

"""Inaudible SilentCipher watermark for generated speech (framework-free): the reference's key and
strength, so its detector recognises our audio; each streamed chunk marked as it leaves (no added
latency, weaker marks on short chunks). Why, with measurements: docs/watermark.md.

The model is our own PyTorch port of Sony's silentcipher 1.0.5 (:mod:`misotts_agents.model.silentcipher`,
same output; the package itself pins torch<=2.0 and is only a test oracle). It keeps no state between
calls, so one :class:`Watermarker` may be used from several threads at once and instances are
independent.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from misotts_agents.audio import SAMPLE_RATE, check_mono_float
from misotts_agents.errors import ModelSourceError

if TYPE_CHECKING:
    from misotts_agents.model.silentcipher import SilentCipher, SilentCipherConfig
    from misotts_agents.model.watermark_stream import StreamWatermarker

__all__ = [
    "DEFAULT_WATERMARK_KEY",
    "DEFAULT_WATERMARK_SOURCE",
    "MIN_DETECT_SAMPLES_44K",
    "MIN_DETECT_SECONDS",
    "REQUIRED_FILES",
    "SILENTCIPHER_SUBDIR",
    "WATERMARK_MESSAGE_SDR",
    "WATERMARK_SAMPLE_RATE",
    "MarkRow",
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

#: The checkpoint directory's files (what silentcipher's ``get_model`` reads for the 44.1k model).
#: ``dec_m_0.ckpt`` is only used for detection, but it is loaded with the others, as the package does.
REQUIRED_FILES: tuple[str, ...] = ("hparams.yaml", "enc_c.ckpt", "dec_c.ckpt", "dec_m_0.ckpt")

#: Shortest 44.1 kHz input that yields one whole 21-frame message window.  The STFT zero-pads the
#: input to the next multiple of N_FFT=4096 (always adding at least one sample) and, with center=True,
#: yields 1 + padded/2048 frames; 21 frames need padded >= 40960, i.e. at least 9 * 4096 input samples.
#: Anything shorter cannot be decoded (silentcipher's ``decode_wav`` fails inside its own try/except).
MIN_DETECT_SAMPLES_44K = 9 * 4096  # 36,864 samples
MIN_DETECT_SECONDS = MIN_DETECT_SAMPLES_44K / WATERMARK_SAMPLE_RATE  # ~0.836 s

# How many STFT frames (rows x frames) one marking call holds. On 2 CPU cores a batch pays off only
# while it stays small (measured: 2 rows of 80 ms 1.5x faster per row than one; 2 rows of 1.1 s 1.2x
# slower, the activations, 96 channels x 2049 bins a frame, leave the cache), so a CPU call holds
# about one second-long window; on a GPU one call for the whole step is the point (launches, not
# arithmetic, bound small calls), capped so its activations stay near 0.5 GB. Not yet measured there.
CPU_BATCH_FRAMES = 26
GPU_BATCH_FRAMES = 640

# Below this mean power (RMS 1e-6, -120 dBFS) a clip is treated as silence and left untouched:
# SilentCipher normalises by the clip's power and would divide by (nearly) zero (the package gives NaN),
# and a mark 36 dB under -120 dBFS would be below 24-bit quantisation anyway.
_SILENCE_POWER = 1e-12

# `hf` is huggingface_hub's CLI since 1.0 (the old `huggingface-cli` entry point is gone there).
_HOW_TO_PROVIDE = (
    "Pass a local directory with " + ", ".join(REQUIRED_FILES) + " (or one containing "
    f"{SILENTCIPHER_SUBDIR}/ with them), download {DEFAULT_WATERMARK_SOURCE} with "
    f"`hf download {DEFAULT_WATERMARK_SOURCE} --include '{SILENTCIPHER_SUBDIR}/*'` (then it is found in "
    "the Hugging Face cache, also with HF_HUB_OFFLINE=1), or disable watermarking explicitly with "
    "--no-watermark / watermark=False."
)


class WatermarkUnavailable(ModelSourceError, RuntimeError):
    """The SilentCipher weights cannot be found or loaded.

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

    SilentCipher carries exactly 40 bits (five bytes), and checking at load time fails before any
    audio is produced.  Wrong types raise ``ValueError`` too, so callers (CLI flags, config files)
    have one exception type to turn into a usage error.
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

    A path that is wrong is an error, never a reason to download (silentcipher's own ``get_model``
    silently falls back to downloading the whole repo, which turns a typo into a surprise network
    access).  Every failure raises :class:`WatermarkUnavailable`.
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


@dataclass(frozen=True)
class MarkRow:
    """One clip to mark at 44.1 kHz (float64), as a row of a batched call (:meth:`Watermarker.mark_rows`).

    ``phase``: the message position of its first STFT frame (0 for a whole clip); ``power``: the
    utterance's mean power when the clip is a window of a longer streamed utterance, else None (the
    clip's own, as the whole-clip algorithm has it).
    """

    audio44: np.ndarray
    phase: int
    power: float | None


class Watermarker:
    """Embeds and detects a 5-byte SilentCipher message (44.1 kHz model) in mono audio.

    Build it with :meth:`load`.  Calls share no mutable state (the model is read-only after loading),
    so one instance may be used by several sessions and threads at once, and separate instances
    never affect each other.
    """

    def __init__(
        self,
        model: SilentCipher,
        *,
        key: Sequence[int] = DEFAULT_WATERMARK_KEY,
        source_dir: Path | None = None,
    ) -> None:
        """Wrap an already loaded :class:`~misotts_agents.model.silentcipher.SilentCipher`; prefer :meth:`load`."""
        self._model = model
        self._key = _validate_key(key)
        self._source_dir = source_dir
        self.batch_frames = GPU_BATCH_FRAMES if model.device.type == "cuda" else CPU_BATCH_FRAMES
        """STFT frames one model call may hold in all (:meth:`mark_rows`)."""

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
        corrupt checkpoint, a key or shape that does not fit, wrong hparams), ``ValueError`` for a
        bad key.
        """
        valid_key = _validate_key(key)
        ckpt_dir = resolve_silentcipher_dir(source)
        from misotts_agents.model.silentcipher import SilentCipher

        try:
            model = SilentCipher.load(ckpt_dir, device)
        except Exception as exc:  # missing/corrupt/mismatched file, bad yaml or hparams, device errors
            raise WatermarkUnavailable(
                f"Could not load the SilentCipher checkpoints in {ckpt_dir} "
                f"({type(exc).__name__}: {exc}). {_HOW_TO_PROVIDE}"
            ) from exc
        _check_config(model.config, ckpt_dir)
        return cls(model, key=valid_key, source_dir=ckpt_dir)

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        """The 5-byte message embedded by :meth:`apply` and looked for by :meth:`detect`."""
        return self._key

    @property
    def model(self) -> SilentCipher:
        """The SilentCipher model (for batched marking of 44.1 kHz audio with :meth:`SilentCipher.embed`)."""
        return self._model

    @property
    def source_dir(self) -> Path | None:
        """Directory the checkpoints were loaded from (None when built from a model object)."""
        return self._source_dir

    def apply(self, audio: npt.ArrayLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """Return ``audio`` with the watermark embedded: same length, rate and dtype.

        ``audio`` is mono floating-point (1-D).  Empty input returns an empty copy; (near-)silent
        input is returned unchanged, because there is no signal to hide a message in (the mark is
        scaled to the clip's power).  Any length works; very short inputs get a weak mark (see
        docs/watermark.md).
        """
        return self.apply_batch([audio], sample_rate)[0]

    def apply_batch(self, clips: Sequence[npt.ArrayLike], sample_rate: int = SAMPLE_RATE) -> list[np.ndarray]:
        """:meth:`apply` for several independent clips, in as few model calls as their lengths allow
        (:meth:`mark_rows`). Each clip comes back exactly as :meth:`apply` would return it alone."""
        rate = _check_rate(sample_rate)
        inputs = [check_mono_float(clip) for clip in clips]
        out = [x.copy() for x in inputs]  # empty and silent clips stay as they are
        todo: list[tuple[int, MarkRow]] = []
        for i, x in enumerate(inputs):
            if x.size == 0:
                continue
            y44 = _resample(x.astype(np.float64), rate, WATERMARK_SAMPLE_RATE)
            if float(np.mean(np.square(y44))) >= _SILENCE_POWER:
                todo.append((i, MarkRow(y44, 0, None)))
        for (i, row), marked in zip(todo, self.mark_rows([row for _, row in todo]), strict=True):
            x = inputs[i]
            residual = _fit_length(_resample(marked - row.audio44, WATERMARK_SAMPLE_RATE, rate), x.shape[0])
            out[i] = (x.astype(np.float64) + residual).astype(x.dtype, copy=False)
        return out

    def mark_rows(self, rows: Sequence[MarkRow]) -> list[np.ndarray]:
        """Each row's 44.1 kHz audio with our key embedded, in as few model calls as pay off.

        Rows whose lengths pad to the same STFT length (and that are all whole clips, or all windows
        of streamed utterances) are zero-padded into one batch: the analysis would pad each with
        zeros to that length anyway, so each row is marked exactly as alone (up to the float rounding
        of batched kernels). A batch holds at most :attr:`batch_frames` STFT frames in all (at least
        one row). Raises if a model call fails.
        """
        spectrogram = self._model.spectrogram
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault((spectrogram.padded_length(row.audio44.size), row.power is None), []).append(i)
        out: list[np.ndarray] = [np.zeros(0)] * len(rows)
        for (padded, _), members in groups.items():
            per_call = max(1, self.batch_frames // spectrogram.frames(padded - 1))
            for first in range(0, len(members), per_call):
                batch = members[first : first + per_call]
                for i, marked in zip(batch, self._embed_batch([rows[i] for i in batch]), strict=True):
                    out[i] = marked
        return out

    def _embed_batch(self, rows: list[MarkRow]) -> list[np.ndarray]:
        import torch

        lengths = [row.audio44.size for row in rows]
        batch = np.zeros((len(rows), max(lengths)))
        for r, row in enumerate(rows):
            batch[r, : lengths[r]] = row.audio44
        powers = None if rows[0].power is None else torch.tensor([float(row.power or 0.0) for row in rows])
        # float64 in: the model then scales each clip's power in float64 around its float32
        # networks, as silentcipher does with a float64 array.
        marked = self._model.embed(
            torch.from_numpy(batch),
            self._key,
            sdr=WATERMARK_MESSAGE_SDR,
            phases=[row.phase for row in rows],
            powers=powers,
            lengths=lengths,
        )
        return [marked[r, :n].cpu().numpy() for r, n in enumerate(lengths)]

    def mark_streams(self, items: Sequence[tuple[StreamWatermarker, npt.ArrayLike]]) -> list[np.ndarray | Exception]:
        """Mark the next chunk of several streams at once (an engine step's chunks), in one batched
        pass (model/watermark_stream.py: each chunk marked in its utterance's context).

        Each item is a stream's state and its next chunk; each stream's state advances by its chunk.
        Returns, per item, the marked chunk (same length and dtype), or the exception that marking
        that item raised: one stream's failure never costs another its audio. A stream may appear
        once per call.
        """
        from misotts_agents.model.watermark_stream import mark_streams

        return mark_streams(self, items)

    def detect(self, audio: npt.ArrayLike, sample_rate: int, *, phase_shift: bool = False) -> WatermarkDetection:
        """Decode the SilentCipher message in ``audio`` and compare it with our key.

        Never raises for clips that are merely too short or silent; the result says why nothing was
        found.  ``phase_shift=True`` is what the MisoTTS reference verifier uses: it searches 205
        sample offsets for the best frame alignment, which makes it robust to audio that was cut at an
        arbitrary point, but runs the message decoder once per offset over the whole clip, i.e.
        minutes on CPU.  The default (False) assumes the clip starts where the mark started, which
        holds for files written by this package.
        """
        import torch

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
        # float32 in: the power scaling is then done in float32, as silentcipher does with float32 audio.
        result = self._model.detect(torch.from_numpy(np.ascontiguousarray(y44)), phase_shift=phase_shift)
        if result.message is None:
            return WatermarkDetection(False, None, None, f"no SilentCipher message found ({result.error})")
        message = result.message
        if message == self._key:
            return WatermarkDetection(True, message, result.confidence, "SilentCipher message matches our key")
        return WatermarkDetection(
            False,
            message,
            result.confidence,
            f"SilentCipher message {list(message)} is not our key {list(self._key)}",
        )


def _check_config(config: SilentCipherConfig, ckpt_dir: Path) -> None:
    """Reject a checkpoint that loaded but is not the 44.1 kHz model this module is built around.

    The model itself refuses hparams it cannot run (message format, normalisation branches); this
    adds what the wrapper assumes: audio is resampled to 44.1 kHz, and the detection minimum
    (:data:`MIN_DETECT_SAMPLES_44K`) follows from N_FFT 4096 and HOP_LENGTH 2048.
    """
    problems = []
    if config.sample_rate != WATERMARK_SAMPLE_RATE:
        problems.append(f"SR is {config.sample_rate}, expected {WATERMARK_SAMPLE_RATE}")
    if (config.n_fft, config.hop_length) != (4096, 2048):
        problems.append(f"N_FFT/HOP_LENGTH are {config.n_fft}/{config.hop_length}, expected 4096/2048")
    if problems:
        raise WatermarkUnavailable(
            f"The SilentCipher model in {ckpt_dir} is not usable: {'; '.join(problems)}. {_HOW_TO_PROVIDE}"
        )


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

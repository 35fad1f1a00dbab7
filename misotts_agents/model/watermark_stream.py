"""Marking an utterance as it streams, chunk by chunk, the way the whole-clip mark would have it.

SilentCipher is a whole-clip algorithm: its networks see about +/-0.33 s of spectrogram around each
frame and normalise over the whole clip, the clip's power sets the scale it works at, and the 21-frame
message starts at the clip's first STFT frame. A chunk marked on its own gets none of that right (its
residual correlated 0.24 with the whole-clip mark at 80 ms, docs/watermark.md). So each stream carries
what the whole-clip algorithm would have seen, and nothing is held back:

* **left context**: the chunk is marked inside a window that starts up to ``context_s`` (default 1 s)
  earlier in the utterance's unmarked audio, so the convolutions and the normalisation see the audio
  before it; only the new samples' residual is emitted (the context was emitted before);
* **the STFT grid and the message phase of the utterance**: the window starts on a frame boundary of
  the whole utterance (every 2048 samples at 44.1 kHz), and its first frame carries the message
  symbol the whole-clip mark puts there, instead of restarting the message;
* **a running power estimate**: the utterance's mean power so far stands in for the whole clip's
  power (the scale the networks work at, and, relative to the window's own power, the carrier RMS the
  mark is scaled by).

What no streaming mark can have is the audio after the chunk (the right half of the convolutions'
reach): that, and statistics of the future, are the remaining difference, measured in
benchmarks/watermark_streaming.py. Several streams' windows are marked in one batched call
(:func:`mark_streams`), each row with its own statistics, so a stream's marks do not depend on which
other streams shared the call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from misotts_agents.audio import SAMPLE_RATE, check_mono_float
from misotts_agents.model.watermark import (
    _SILENCE_POWER,
    WATERMARK_SAMPLE_RATE,
    MarkRow,
    _check_rate,
    _fit_length,
    _resample,
)

if TYPE_CHECKING:
    from misotts_agents.model.watermark import Watermarker

__all__ = ["DEFAULT_CONTEXT_S", "StreamWatermarker", "mark_streams"]

#: Seconds of the utterance's earlier audio each chunk is marked with (its left context). The
#: convolutions reach ~0.33 s; the rest steadies the normalisation statistics. A window costs its
#: whole length to mark, so at 80 ms chunks the default makes marking ~13x the chunk's own cost.
DEFAULT_CONTEXT_S = 1.0
_MESSAGE_FRAMES = 21  # message symbols per repetition (5 bytes as 2-bit symbols, plus the end marker)


@dataclass
class _Window:
    """One chunk's marking window, prepared without touching its stream's state."""

    state: StreamWatermarker
    chunk: np.ndarray  # as given (its dtype is the output's)
    audio: np.ndarray  # float64: context + chunk, at the stream's rate
    crop: int  # 44.1 kHz samples dropped at the window's start to land on the utterance's frame grid
    energy: float  # the utterance's sum of squares once this chunk is in
    row: MarkRow | None  # None: nothing to mark (silence so far)


class StreamWatermarker:
    """One utterance's marking state: its recent unmarked audio, position and running power.

    Feed its chunks in order, through :meth:`process` (one stream) or :func:`mark_streams` (an
    engine step's chunks together). Errors propagate: emitting unmarked audio while claiming to
    watermark is the caller's decision to make, not this class's; a chunk whose marking failed leaves
    the state as it was.
    """

    def __init__(
        self, watermarker: Watermarker, sample_rate: int = SAMPLE_RATE, context_s: float = DEFAULT_CONTEXT_S
    ) -> None:
        if not 0.1 <= context_s <= 30:
            raise ValueError(f"context_s must be in 0.1..30 seconds, got {context_s!r}")
        self._watermarker = watermarker
        self._sample_rate = _check_rate(sample_rate)
        self._context = round(context_s * self._sample_rate)
        self._history = np.zeros(0, dtype=np.float64)  # the last `context` samples, unmarked
        self._samples = 0  # samples marked so far: where the next chunk starts in the utterance
        self._energy = 0.0  # sum of squares of those samples

    @property
    def sample_rate(self) -> int:
        return self._sample_rate

    @property
    def samples_processed(self) -> int:
        """Total samples returned so far for this utterance."""
        return self._samples

    def process(self, chunk: npt.ArrayLike) -> np.ndarray:
        """Return the utterance's next ``chunk`` watermarked, same length and dtype."""
        (out,) = mark_streams(self._watermarker, [(self, chunk)])
        if isinstance(out, Exception):
            raise out
        return out

    def _window(self, chunk: npt.ArrayLike) -> _Window:
        """The window to mark ``chunk`` in: the context and the chunk, on the utterance's frame grid."""
        x = check_mono_float(chunk)
        audio = np.concatenate([self._history, x.astype(np.float64)])
        energy = self._energy + float(np.dot(audio[self._history.size :], audio[self._history.size :]))
        samples = self._samples + x.size
        power = energy / samples if samples else 0.0
        if x.size == 0 or power < _SILENCE_POWER:
            return _Window(self, x, audio, 0, energy, None)
        audio44 = _resample(audio, self._sample_rate, WATERMARK_SAMPLE_RATE)
        hop = self._watermarker.model.config.hop_length
        start44 = round((self._samples - self._history.size) * WATERMARK_SAMPLE_RATE / self._sample_rate)
        crop = -start44 % hop
        if crop >= audio44.size:  # a short window this far in cannot reach the next frame boundary
            crop = 0
        phase = (start44 + crop) // hop % _MESSAGE_FRAMES
        return _Window(self, x, audio, crop, energy, MarkRow(audio44[crop:], phase, power))

    def _commit(self, window: _Window, marked44: np.ndarray | None) -> np.ndarray:
        """Emit the chunk with the new samples' share of the window's residual; advance the state."""
        x = window.chunk
        out = x.copy()
        if window.row is not None and marked44 is not None:
            residual44 = np.concatenate([np.zeros(window.crop), marked44 - window.row.audio44])
            residual = _fit_length(_resample(residual44, WATERMARK_SAMPLE_RATE, self._sample_rate), window.audio.size)
            out = (x.astype(np.float64) + residual[window.audio.size - x.size :]).astype(x.dtype, copy=False)
        self._history = window.audio[-self._context :].copy()
        self._samples += x.size
        self._energy = window.energy
        return out


def mark_streams(
    watermarker: Watermarker, items: Sequence[tuple[StreamWatermarker, npt.ArrayLike]]
) -> list[np.ndarray | Exception]:
    """Mark the next chunk of several streams at once (an engine step's chunks): see
    :meth:`Watermarker.mark_streams`. If the batched call fails, each window is retried alone, so
    only the windows that fail by themselves come back as exceptions."""
    windows: list[_Window | Exception] = []
    for state, chunk in items:
        try:
            windows.append(state._window(chunk))
        except Exception as exc:  # a bad chunk (shape, dtype, NaN) fails its own item
            windows.append(exc)
    todo = [(i, w.row) for i, w in enumerate(windows) if isinstance(w, _Window) and w.row is not None]
    marked: dict[int, np.ndarray | Exception] = {}
    try:
        marked.update(zip([i for i, _ in todo], watermarker.mark_rows([row for _, row in todo]), strict=True))
    except Exception:
        for i, row in todo:
            try:
                marked[i] = watermarker.mark_rows([row])[0]
            except Exception as exc:
                marked[i] = exc
    out: list[np.ndarray | Exception] = []
    for i, w in enumerate(windows):
        result = w if isinstance(w, Exception) else marked.get(i)  # None: a window with nothing to mark
        if isinstance(result, Exception):
            out.append(result)
            continue
        assert isinstance(w, _Window)
        try:
            out.append(w.state._commit(w, result))
        except Exception as exc:
            out.append(exc)
    return out

"""How a 5-byte SilentCipher message becomes per-frame symbols, and how decoded frames become bytes.

A message is 5 bytes = 40 bits = 20 two-bit symbols.  Each symbol ``s`` is sent as class ``s + 1``
and an end marker (class 0) follows, so one message window is 21 frames long and there are 5
classes.  The window repeats over the whole clip from frame 0.  Decoding votes per window position
across all whole windows in the clip and then rotates the voted window so that it starts right after
the end marker, which makes detection independent of where the clip was cut in whole frames.

Everything here follows silentcipher 1.0.5 (``letters_encoding``, ``decode_wav``,
``get_best_ps``), including what it does with undecodable garbage, so the same frames give the
same message, confidence or failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

#: Frames per message window: 20 symbols and the end marker.
MESSAGE_LEN = 21
#: Classes per frame: the end marker and the four two-bit symbols.
MESSAGE_DIM = 5
#: Bytes per message.
MESSAGE_BYTES = 5
END_MARKER = 0


@dataclass(frozen=True)
class DecodedMessage:
    """What the message decoder found in a clip (silentcipher's ``decode_wav`` result, as a type).

    ``message`` is the decoded 5 "bytes" (with garbage input a value can fall outside 0..255, as the
    package's parsing allows negative numbers); ``confidence`` is the share of (window, position)
    frames that agree with the per-position vote, rounded to float32 as the package computes it.
    Both are None when nothing could be decoded, and ``error`` says why.
    """

    message: tuple[int, ...] | None
    confidence: float | None
    error: str | None = None

    @property
    def found(self) -> bool:
        return self.message is not None


def message_symbols(message: Sequence[int]) -> list[int]:
    """The 20 two-bit symbols of 5 bytes, most significant bits first."""
    if len(message) != MESSAGE_BYTES or not all(0 <= int(b) <= 255 for b in message):
        raise ValueError(f"a SilentCipher message is {MESSAGE_BYTES} ints in 0..255, got {list(message)!r}")
    return [(int(byte) >> shift) & 3 for byte in message for shift in (6, 4, 2, 0)]


def message_one_hot(
    message: Sequence[int], frames: int, device: torch.device | str = "cpu", phases: Sequence[int] = (0,)
) -> torch.Tensor:
    """(rows, 1, MESSAGE_DIM, frames) float32 one-hot classes: the 21-frame window repeated, row r's
    first frame being the window's position ``phases[r]`` (0 for a whole clip).

    At phase 0 the last window is cut short where the clip ends (the package tiles whole windows and
    appends the first ``frames % 21`` columns, which is the same thing). A streamed chunk's frames sit
    further along its utterance: its phase continues the utterance's message instead of restarting it.
    """
    classes = [s + 1 for s in message_symbols(message)] + [END_MARKER]
    window = torch.tensor(classes, device=device)
    offsets = torch.tensor([int(p) for p in phases], device=device)[:, None]
    per_frame = window[(offsets + torch.arange(frames, device=device)) % MESSAGE_LEN]
    one_hot = torch.nn.functional.one_hot(per_frame, MESSAGE_DIM).to(torch.float32)  # (rows, frames, dim)
    return one_hot.transpose(1, 2)[:, None]


def window_votes(classes: np.ndarray) -> np.ndarray:
    """Per-frame argmax classes (frames,) -> whole windows (n, 21); the incomplete tail is dropped."""
    whole = classes.shape[0] // MESSAGE_LEN * MESSAGE_LEN
    return classes[:whole].reshape(-1, MESSAGE_LEN)


def alignment_score(windows: np.ndarray) -> float:
    """How consistently the windows agree, for choosing the phase shift (the package's check_accuracy).

    The mean over the 21 positions of the largest vote share, summed in the package's order so that
    ties between shifts are broken the same way.  Raises ``ValueError`` with no whole window, which
    makes the package's whole phase-shift decode fail.
    """
    if windows.shape[0] == 0:
        raise ValueError("no whole message window")
    total = 0.0
    for position in range(windows.shape[1]):
        total += int(np.bincount(windows[:, position]).max()) / windows.shape[0]
    return total / windows.shape[1]


def decode_windows(windows: np.ndarray) -> DecodedMessage:
    """Vote, rotate at the end marker and read the bytes, as the package does.

    Quirks kept: the vote per position is the mode with ties going to the smallest class (scipy's
    rule); the message starts after the *first* end marker in the voted window and any further
    marker becomes the symbol -1; the symbols are written as ``format(s, "02b")`` and read back in
    8-character pieces with ``int(piece, 2)``, so a -1 (written "-1") either yields a negative
    "byte" or makes the piece unreadable (then nothing is decoded).
    """
    if windows.shape[0] == 0:
        return DecodedMessage(None, None, "no whole 21-frame message window")
    counts = np.stack([np.bincount(windows[:, i], minlength=MESSAGE_DIM) for i in range(windows.shape[1])])
    voted = counts.argmax(axis=1)  # argmax returns the first maximum: the smallest class among ties
    agree = int(np.count_nonzero(windows == voted[None]))
    confidence = float(np.float32(agree) / np.float32(windows.size))
    markers = np.flatnonzero(voted == END_MARKER)
    if markers.size == 0:
        return DecodedMessage(None, None, "no end marker in the voted message window")
    end = int(markers[0])
    symbols = [int(c) - 1 for c in np.concatenate([voted[end + 1 :], voted[:end]])]
    bits = "".join(format(s, "02b") for s in symbols)
    try:
        values = tuple(int(bits[i : i + 8], 2) for i in range(0, len(bits) // 8 * 8, 8))
    except ValueError:
        return DecodedMessage(None, None, "the voted symbols do not form bytes (a repeated end marker)")
    return DecodedMessage(values, confidence)

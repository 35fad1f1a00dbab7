"""Deterministic test signals."""

import numpy as np


def tone(seconds: float, rate: int = 24_000, freq: float = 220.0) -> np.ndarray:
    """A deterministic voiced-like test signal: a few harmonics with a slow amplitude wobble."""
    t = np.arange(int(seconds * rate)) / rate
    wave = sum(np.sin(2 * np.pi * freq * h * t) / h for h in (1, 2, 3))
    return (0.2 * wave * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def wait_until(condition, timeout: float = 30.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return condition()


def speechlike(seconds: float, sr: int = 24_000, seed: int = 0) -> np.ndarray:
    """A few harmonics of a gliding 140 Hz fundamental, amplitude-modulated, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sr)) / sr
    f0 = 140.0 + 20.0 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    sig = sum(np.sin(k * phase) / k for k in range(1, 6))
    sig = sig * (0.6 + 0.4 * np.sin(2 * np.pi * 3.0 * t)) * 0.2
    sig = sig + 0.005 * rng.standard_normal(t.shape)
    return sig.astype(np.float32)

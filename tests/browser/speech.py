"""A short spoken phrase followed by a long silence, as a WAV for Chromium's fake microphone.

The lead-in silence covers the WebRTC connection set-up (the file starts playing when the page
opens). Chromium loops the file, so the silence after the phrase is what lets the bot's reply play out before the "user"
speaks again (speaking would barge in and cut the reply). The phrase comes from espeak-ng when it is
installed, else it is synthesised here: a glottal pulse train with a wandering pitch through vowel
formant filters, in syllables -- close enough to speech for Silero VAD.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

PHRASE = "could you tell me the weather for tomorrow"
VOWELS = {"a": (730, 1090, 2440), "i": (270, 2290, 3010), "u": (300, 870, 2240), "e": (530, 1840, 2480)}


def espeak_phrase(text: str = PHRASE) -> tuple[np.ndarray, int] | None:
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "phrase.wav"
        subprocess.run([exe, "-s", "160", "-w", str(path), text], check=True, capture_output=True)
        audio, rate = sf.read(path, dtype="float32")
    return audio, rate


def _resonate(x: np.ndarray, freq: float, bandwidth: float, rate: int) -> np.ndarray:
    r = np.exp(-np.pi * bandwidth / rate)
    a1, a2 = -2 * r * np.cos(2 * np.pi * freq / rate), r * r
    y = np.zeros_like(x)
    y1 = y2 = 0.0
    for n, v in enumerate(x):
        y0 = v - a1 * y1 - a2 * y2
        y[n] = y0
        y2, y1 = y1, y0
    return y


def synthetic_phrase(rate: int = 16000, seconds: float = 1.6, seed: int = 0) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    out = []
    t_total = 0.0
    vowels = list(VOWELS.values())
    while t_total < seconds:
        dur = rng.uniform(0.14, 0.26)
        n = int(dur * rate)
        f0 = 120 + 25 * np.sin(2 * np.pi * 0.7 * (t_total + np.arange(n) / rate)) + rng.normal(0, 1.5, n)
        phase = np.cumsum(f0 / rate)
        pulses = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
        f1, f2, f3 = vowels[rng.integers(len(vowels))]
        voiced = sum(_resonate(pulses, f, 80 + f / 20, rate) * g for f, g in ((f1, 1.0), (f2, 0.5), (f3, 0.25)))
        env = np.sin(np.pi * np.arange(n) / n) ** 0.6
        out.append(voiced * env)
        gap = int(rng.uniform(0.02, 0.07) * rate)
        out.append(rng.normal(0, 0.002, gap))
        t_total += dur + gap / rate
    audio = np.concatenate(out)
    return (0.5 * audio / np.max(np.abs(audio))).astype(np.float32), rate


def make_mic_wav(path: Path, *, silence_s: float = 12.0, lead_s: float = 6.0, prefer_espeak: bool = True) -> str:
    """Write the fake-microphone WAV; returns which source made the speech ("espeak-ng" or "synthetic")."""
    made = espeak_phrase() if prefer_espeak else None
    source = "espeak-ng"
    if made is None:
        made, source = synthetic_phrase(), "synthetic"
    audio, rate = made
    audio = np.concatenate([np.zeros(int(lead_s * rate)), audio, np.zeros(int(silence_s * rate))])
    sf.write(path, audio.astype(np.float32), rate, subtype="PCM_16")
    return source


VOICE_TEXT = (
    "Hello, this is a sample of my voice. I speak slowly and clearly, so that the model can learn "
    "how I sound, and then answer you in the same voice."
)


def make_voice_clip(path: Path) -> tuple[str, float]:
    """A voice-prompt clip (about 10 s of espeak-ng speech, else the synthetic phrase) as a WAV file;
    returns its transcript and its length in seconds."""
    made = espeak_phrase(VOICE_TEXT)
    text = VOICE_TEXT
    if made is None:
        made, text = synthetic_phrase(seconds=8.0), "(a synthetic voice with no words)"
    audio, rate = made
    sf.write(path, audio.astype(np.float32), rate, subtype="PCM_16")
    return text, len(audio) / rate

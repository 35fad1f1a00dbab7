"""The short-time Fourier transform SilentCipher works in, computed the way silentcipher 1.0.5 does.

The network sees STFT magnitudes (n_fft 4096, hop 2048 for the 44.1 kHz model) and the mark is put
back with the clip's own phase, so the framing decides which samples land in which frame: the right
padding, the centred frames and the inverse's trimming below are the package's, not a choice.
"""

from __future__ import annotations

import torch


class Spectrogram:
    """Magnitude/phase analysis and resynthesis with one periodic Hann window, per instance.

    The package keeps one process-wide STFT object and stores the clip length on it between the
    forward and the inverse transform; here the length is an argument and the window is per
    instance and never mutated, so concurrent calls share nothing.
    """

    def __init__(self, n_fft: int, hop_length: int, device: torch.device | str = "cpu") -> None:
        self.n_fft = n_fft
        self.hop_length = hop_length
        # torch.hann_window is periodic by default, as in the package.
        self.window = torch.hann_window(n_fft, device=device)

    def padding(self, length: int) -> int:
        """Zeros added on the right of a clip of ``length`` samples before analysis.

        Quirk kept: the package pads by ``n_fft - length % n_fft``, so a clip that already is a
        multiple of n_fft still gets a whole n_fft of zeros (and one more frame) appended.
        """
        return self.n_fft - length % self.n_fft

    def padded_length(self, length: int) -> int:
        """What a clip of ``length`` samples is padded to before analysis: clips with the same
        padded length are analysed identically whatever zeros were appended first."""
        return length + self.padding(length)

    def frames(self, length: int) -> int:
        """Number of STFT frames for a clip of ``length`` samples (centred frames over the padded clip)."""
        return (length + self.padding(length)) // self.hop_length + 1

    def analyse(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Magnitude and phase, each (B, n_fft // 2 + 1, frames), of float32 audio (B, T)."""
        return self.transform(self.pad(audio))

    def pad(self, audio: torch.Tensor) -> torch.Tensor:
        """``audio`` (B, T) right-padded with :meth:`padding` zeros."""
        return torch.nn.functional.pad(audio, (0, self.padding(audio.shape[-1])))

    def transform(self, padded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`analyse` of audio that :meth:`pad` has already padded.

        The package computes the magnitude as ``sqrt(re^2 + im^2 + e) - sqrt(e)`` with ``e = 1e-24``
        only where ``re^2 + im^2`` is exactly zero: that is 0 there and ``sqrt(re^2 + im^2)``
        elsewhere, which is what is computed here (the same operations, so the same bits; not
        ``abs()``, which rounds differently).
        """
        spec = torch.stft(
            padded,
            self.n_fft,
            self.hop_length,
            self.n_fft,
            window=self.window,
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        real, imag = spec.real, spec.imag
        magnitude = torch.sqrt(real**2 + imag**2)
        phase = torch.atan2(imag, real)
        return magnitude, phase

    def synthesise(self, magnitude: torch.Tensor, phase: torch.Tensor, length: int) -> torch.Tensor:
        """Audio (B, ``length``) from a magnitude and the phase :meth:`analyse` returned.

        The spectrum is rebuilt from cos/sin of the phase as the package does (rather than reusing
        the complex STFT), and the inverse covers the padded clip, whose padding is then cut off.
        """
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        audio = torch.istft(spec, self.n_fft, self.hop_length, self.n_fft, window=self.window, center=True)
        return audio[..., :length]

"""SilentCipher inference: embed a 5-byte message in 44.1 kHz audio, and decode it back.

A port of silentcipher 1.0.5's ``Model.encode_wav`` / ``decode_wav`` for the 44.1 kHz checkpoint,
in plain PyTorch on any device, with the package's results (the same watermarked waveform up to float
rounding, the same decoded message and confidence; tests/test_silentcipher_parity.py) but none of its
shared state: the networks are read-only after loading, so one instance serves any number of threads,
and several clips of the same length can be marked in one batched call.  The quirks that decide the
output are kept and named where they happen (here, in networks.py, stft.py and message.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from misotts_agents.model.silentcipher.checkpoint import (
    CARRIER_DECODER_FILE,
    ENCODER_FILE,
    MESSAGE_DECODER_FILE,
    SilentCipherConfig,
    load_state,
    read_hparams,
)
from misotts_agents.model.silentcipher.message import (
    DecodedMessage,
    alignment_score,
    decode_windows,
    message_one_hot,
    message_symbols,
    window_votes,
)
from misotts_agents.model.silentcipher.networks import (
    ENCODER_CHANNELS,
    CarrierDecoder,
    CarrierEncoder,
    MessageDecoder,
)
from misotts_agents.model.silentcipher.stft import Spectrogram

#: The power every clip is scaled to before the networks see it, and scaled back from after (the
#: package's ``average_energy_VCTK``: the mean power of its training corpus).
REFERENCE_POWER = 0.002837200844477648
#: Phase-shift search: the sample offsets tried, every 10 samples over one hop (205 for hop 2048).
PHASE_SHIFT_STEP = 10
# Shifted copies decoded in one batch during the phase-shift search.
_SHIFT_BATCH = 8


def build_networks(config: SilentCipherConfig) -> tuple[CarrierEncoder, CarrierDecoder, MessageDecoder]:
    """The three networks, freshly initialised, shaped by ``config`` (the package's constructor arguments)."""
    encoder = CarrierEncoder(config.enc_n_layers, message_dim=5, message_band_size=config.message_band_size)
    carrier_decoder = CarrierDecoder(config.dec_c_n_layers, config.message_band_size)
    message_decoder = MessageDecoder(message_dim=5, message_band_size=config.message_band_size)
    return encoder, carrier_decoder, message_decoder


class SilentCipher:
    """The SilentCipher 44.1 kHz model: :meth:`embed` marks audio, :meth:`detect` reads the mark.

    Nothing is written after construction (the normalisation layers use each input's own statistics
    and never update their buffers; the STFT keeps no per-call state), so one instance serves
    concurrent calls from any number of threads.  Results are returned on the model's device.
    """

    def __init__(
        self,
        config: SilentCipherConfig,
        encoder: CarrierEncoder,
        carrier_decoder: CarrierDecoder,
        message_decoder: MessageDecoder,
        device: torch.device | str = "cpu",
    ) -> None:
        """Wrap loaded networks (moved to ``device`` and frozen here); prefer :meth:`load`."""
        self.config = config
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval().requires_grad_(False)
        self.carrier_decoder = carrier_decoder.to(self.device).eval().requires_grad_(False)
        self.message_decoder = message_decoder.to(self.device).eval().requires_grad_(False)
        self.spectrogram = Spectrogram(config.n_fft, config.hop_length, self.device)

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> SilentCipher:
        """Read ``hparams.yaml``, ``enc_c.ckpt``, ``dec_c.ckpt`` and ``dec_m_0.ckpt`` from ``directory``.

        Raises ``ModelSourceError`` for a missing file and ``CheckpointError`` (naming the file and
        key) for one that does not fit.
        """
        directory = Path(directory)
        device = torch.device(device)
        config = read_hparams(directory)
        encoder, carrier_decoder, message_decoder = build_networks(config)
        load_state(encoder, directory / ENCODER_FILE, device)
        load_state(carrier_decoder, directory / CARRIER_DECODER_FILE, device)
        load_state(message_decoder, directory / MESSAGE_DECODER_FILE, device)
        return cls(config, encoder, carrier_decoder, message_decoder, device)

    # -- embedding -----------------------------------------------------------------------------

    def embed(
        self,
        audio: torch.Tensor,
        message: Sequence[int],
        sdr: float = 36.0,
        *,
        phases: Sequence[int] | None = None,
        powers: torch.Tensor | None = None,
        lengths: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """``audio`` (B, T) or (T,) at 44.1 kHz with ``message`` (5 bytes) embedded; same shape and dtype.

        By default each row comes out as the package's ``encode_wav(row, 44100, message,
        message_sdr=sdr, calc_sdr=False, disable_checks=True)`` would give it for that row alone:
        every statistic the model takes (clip power, normalisation, loudness) is per row.  Rows with
        no usable power (silence) are returned unchanged instead of the package's NaN.  float64 input
        keeps the package's float64 power scaling (it receives float64 numpy arrays); the networks
        run in float32 as the package's do.

        For a window of a longer utterance (streaming, model/watermark.py): ``phases`` (B,) says at
        which position of the 21-frame message each row's first STFT frame sits, and ``powers`` (B,)
        is the utterance's mean power as known so far, used where the whole-clip algorithm uses the
        clip's power: to scale the audio, and (relative to the window's own power) to estimate the
        utterance's carrier RMS that scales the mark.

        ``lengths`` (B,): each row's true length when rows of different lengths are zero-padded on
        the right into one batch. A row padded to any length with the same STFT padding target
        (:meth:`Spectrogram.padded_length`) is marked exactly as alone: the analysis pads it with
        zeros to that target either way, and its power is taken over its true length.
        """
        if audio.dim() == 1:
            one_power = None if powers is None else powers.reshape(1)
            return self.embed(audio[None], message, sdr, phases=phases, powers=one_power)[0]
        if audio.dim() != 2 or not audio.is_floating_point():
            raise ValueError(f"audio must be a float tensor (B, T) or (T,), got {audio.dtype} {tuple(audio.shape)}")
        message_symbols(message)  # a bad message fails here, before any compute
        rows = audio.shape[0]
        if phases is not None and len(phases) != rows:
            raise ValueError(f"phases must have one value per row ({rows}), got {len(phases)}")
        if powers is not None and tuple(powers.shape) != (rows,):
            raise ValueError(f"powers must have shape ({rows},), got {tuple(powers.shape)}")
        if lengths is not None and (
            len(lengths) != rows
            or any(self.spectrogram.padded_length(n) != self.spectrogram.padded_length(audio.shape[1]) for n in lengths)
        ):
            raise ValueError("lengths must give each row a length with the batch's STFT padding target")
        if audio.shape[1] == 0 or rows == 0:
            return audio.clone()
        # no_grad rather than inference_mode: callers may modify the returned audio in place.
        with torch.no_grad():
            audio = audio.to(self.device)
            clip_power = None if powers is None else powers.to(self.device, audio.dtype)[:, None]
            true = None if lengths is None else torch.tensor(lengths, device=self.device, dtype=audio.dtype)[:, None]
            return self._embed(audio, message, float(sdr), phases or [0] * rows, clip_power, true)

    def _embed(
        self,
        audio: torch.Tensor,
        message: Sequence[int],
        sdr: float,
        phases: Sequence[int],
        clip_power: torch.Tensor | None,
        lengths: torch.Tensor | None,
    ) -> torch.Tensor:
        length = audio.shape[1]
        # Quirk kept: the clip is scaled to the training corpus's mean power before the networks and
        # back afterwards, in the input's precision (float64 in the package).
        if lengths is None:
            own_power = torch.mean(audio**2, dim=1, keepdim=True)
        else:
            own_power = torch.sum(audio**2, dim=1, keepdim=True) / lengths
        power = own_power if clip_power is None else clip_power
        to_reference = torch.sqrt(REFERENCE_POWER / power)
        usable = (own_power > 0) & (power > 0) & torch.isfinite(to_reference)
        to_reference = torch.where(usable, to_reference, torch.ones_like(to_reference))
        scaled = (audio * to_reference).to(torch.float32)

        magnitude, phase = self.spectrogram.analyse(scaled)
        carrier = magnitude[:, None]  # (B, 1, bins, frames)
        batch, _, bins, frames = carrier.shape
        one_hot = message_one_hot(message, frames, self.device, phases)
        plane = self.encoder.message_plane(one_hot, bins)
        channels = (batch, ENCODER_CHANNELS, bins, frames)
        merged = torch.cat([self.encoder(carrier), carrier.expand(channels), plane.expand(channels)], dim=1)
        mark = self.carrier_decoder(merged, sdr)
        # Quirk kept: the mark, normalised per frame in the decoder, is scaled by the whole clip's
        # carrier RMS (utterance-level normalisation) and subtracted from the magnitude, clipped at 0
        # (relu(carrier - mark): the package's ensure_negative_message). A window of a longer
        # utterance scaled by the utterance's power has a carrier power in proportion to its own
        # power: divided out, that estimates the whole utterance's.
        carrier_power = torch.mean(carrier**2, dim=(2, 3), keepdim=True)
        if clip_power is not None:
            ratio = torch.where(usable, power / own_power, torch.ones_like(power)).to(torch.float32)
            carrier_power = carrier_power * ratio[:, :, None, None]
        mark = mark * carrier_power**0.5
        marked = torch.relu(carrier - mark)[:, 0]
        # Quirk kept: resynthesis reuses the original phase.
        out = self.spectrogram.synthesise(marked, phase, length)
        out = out.to(audio.dtype) * torch.sqrt(power / REFERENCE_POWER)
        return torch.where(usable, out, audio)

    # -- detection -----------------------------------------------------------------------------

    def detect(self, audio: torch.Tensor, phase_shift: bool = False) -> DecodedMessage:
        """Decode the message in ``audio`` (T,) at 44.1 kHz, as the package's ``decode_wav``.

        ``phase_shift=True`` first picks the start offset (0, 10, ... samples, up to one hop) whose
        windows agree best, as the package's phase-shift decoding does; it decodes the clip once per
        offset.  Never raises for undecodable audio: the result's ``error`` says why.
        """
        if audio.dim() != 1 or not audio.is_floating_point():
            raise ValueError(f"audio must be a float tensor (T,), got {audio.dtype} {tuple(audio.shape)}")
        with torch.no_grad():
            audio = audio.to(self.device)
            power = torch.mean(audio**2)
            if not bool(power > 0):
                return DecodedMessage(None, None, "silent: zero power")
            # The same power scaling as embed, in the input's precision (float32 from a float32 clip).
            scaled = (audio * torch.sqrt(REFERENCE_POWER / power)).to(torch.float32)
            shift = 0
            if phase_shift:
                try:
                    shift = self._best_shift(scaled)
                except ValueError as exc:
                    return DecodedMessage(None, None, f"phase-shift search failed: {exc}")
            classes = self._frame_classes(self.spectrogram.pad(scaled[None, shift:]))[0]
            return decode_windows(window_votes(classes))

    def _frame_classes(self, padded: torch.Tensor) -> np.ndarray:
        """Padded float32 audio (B, T) -> (B, frames) int: the most likely message class of each frame."""
        magnitude, _ = self.spectrogram.transform(padded)
        logits = self.message_decoder(magnitude[:, None])
        # argmax takes the first of equal logits, as the package's torch.argmax does.
        return logits.argmax(dim=1).cpu().numpy()

    def _best_shift(self, audio: torch.Tensor) -> int:
        """The offset whose windows agree best; the first one wins ties (the package's ``>``).

        Each shifted clip ``audio[s:]`` is padded on its own as the package pads it; shifts whose
        padded clips have the same length are decoded together, a few rows at a time.  Raises
        ``ValueError`` when some offset leaves no whole window: the package's search then fails for
        the whole clip, and so does this one.
        """
        length = audio.shape[0]
        best, best_score = 0, 0.0
        for shifts in self._shift_batches(length):
            padded = torch.stack([self.spectrogram.pad(audio[None, s:])[0] for s in shifts])
            for shift, classes in zip(shifts, self._frame_classes(padded), strict=True):
                score = alignment_score(window_votes(classes))
                if score > best_score:
                    best, best_score = shift, score
        return best

    def _shift_batches(self, length: int) -> Iterator[list[int]]:
        """The offsets to try, in order, grouped by padded length and bounded in memory."""
        shifts = range(0, self.config.hop_length, PHASE_SHIFT_STEP)
        frames = self.spectrogram.frames(length)
        # Keep one block's activations (128 channels x band x frames, float32) near 256 MB a batch.
        per_row = 128 * self.config.message_band_size * frames
        rows = max(1, min(_SHIFT_BATCH, (64 << 20) // per_row))
        batch: list[int] = []
        for shift in shifts:
            if batch and (len(batch) == rows or self._padded(length - shift) != self._padded(length - batch[0])):
                yield batch
                batch = []
            batch.append(shift)
        if batch:
            yield batch

    def _padded(self, length: int) -> int:
        length = max(0, length)  # a shift past the end leaves an empty clip, padded to one n_fft
        return length + self.spectrogram.padding(length)

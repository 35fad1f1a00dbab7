"""Streaming encoders for the OpenAI-compatible speech endpoint: ``pcm``, ``wav``, ``mp3``, ``opus``
(in Ogg), ``aac`` (ADTS) and ``flac``, fed 24 kHz mono chunks as the engine makes them.

Each :class:`StreamEncoder` turns one chunk into the bytes that are ready to send now, so a client
gets its first bytes with the first chunk (for AAC, whose encoder looks 1024 samples ahead, once
2048 samples, 85 ms, are in) and can start playing a compressed stream before the text is spoken to
the end. The compressed formats use PyAV (FFmpeg's encoders and muxers, installed with aiortc),
muxing into a write-only sink: the muxers then write streamable output (no seek back to patch a
header), the Ogg muxer is told to close a page per Opus packet instead of one per second, and every
packet is flushed out of FFmpeg's I/O buffer at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from misotts_agents.audio import SAMPLE_RATE, to_int16

if TYPE_CHECKING:
    from av.audio.stream import AudioStream


@dataclass(frozen=True)
class AudioFormat:
    """One ``response_format``: its content type, and for the compressed ones the FFmpeg muxer,
    encoder and encoder settings."""

    content_type: str
    muxer: str | None = None  # None: raw 16-bit PCM (with a WAV header for "wav")
    codec: str | None = None
    bit_rate: int | None = None
    muxer_options: dict[str, str] = field(default_factory=dict)
    frame_size: int | None = None  # encoder block size in samples, where the codec lets us choose


FORMATS: dict[str, AudioFormat] = {
    "pcm": AudioFormat("audio/pcm"),
    "wav": AudioFormat("audio/wav"),
    "mp3": AudioFormat("audio/mpeg", "mp3", "libmp3lame", bit_rate=64_000),
    # page_duration is in microseconds: one Ogg page per 20 ms Opus packet (the default holds 1 s).
    "opus": AudioFormat("audio/ogg", "ogg", "libopus", bit_rate=48_000, muxer_options={"page_duration": "20000"}),
    "aac": AudioFormat("audio/aac", "adts", "aac", bit_rate=64_000),
    # FLAC's default block (4608 samples at this rate) would hold the first 190 ms back.
    "flac": AudioFormat("audio/flac", "flac", "flac", frame_size=1152),
}
DEFAULT_FORMAT = "wav"


class StreamEncoder:
    """Encodes one response: :meth:`encode` each float32 mono chunk, then :meth:`finish` once; each
    returns the bytes to send now (possibly none). :meth:`close` releases an abandoned encoder."""

    def __init__(self, fmt: str, sample_rate: int = SAMPLE_RATE) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown audio format {fmt!r}; one of {', '.join(FORMATS)}")
        self.format = fmt
        self.spec = FORMATS[fmt]
        self.sample_rate = sample_rate
        self._header = wav_header(sample_rate) if fmt == "wav" else b""
        spec = self.spec
        self._av = _AVEncoder(spec.muxer, spec.codec, spec, sample_rate) if spec.muxer and spec.codec else None

    @property
    def content_type(self) -> str:
        return self.spec.content_type

    def encode(self, pcm: np.ndarray) -> bytes:
        if self._av is not None:
            return self._av.encode(pcm)
        head, self._header = self._header, b""
        return head + to_int16(pcm)

    def finish(self) -> bytes:
        if self._av is not None:
            return self._av.finish()
        head, self._header = self._header, b""
        return head  # a WAV response with no audio is still a WAV file

    def close(self) -> None:
        if self._av is not None:
            self._av.close()


class _Sink:
    """A write-only file for FFmpeg: what the muxer writes, collected until taken."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: Any) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


class _AVEncoder:
    def __init__(self, muxer: str, codec: str, spec: AudioFormat, sample_rate: int) -> None:
        import av

        self._av = av
        self._sink = _Sink()
        # flush_packets: each packet leaves FFmpeg's I/O buffer as soon as it is muxed.
        options = {"flush_packets": "1", **spec.muxer_options}
        self._container = av.open(self._sink, mode="w", format=muxer, options=options, buffer_size=4096)
        codec_options = {"frame_size": str(spec.frame_size)} if spec.frame_size else {}
        stream = self._container.add_stream(codec, rate=sample_rate, layout="mono", options=codec_options)
        self._stream = cast("AudioStream", stream)
        if spec.bit_rate:
            self._stream.codec_context.bit_rate = spec.bit_rate
        self._container.start_encoding()  # the header now: it leaves with the first chunk, or alone
        self._rate = sample_rate
        self._pts = 0
        self._closed = False

    def encode(self, pcm: np.ndarray) -> bytes:
        samples = np.ascontiguousarray(pcm, dtype=np.float32).reshape(1, -1)
        if samples.size:
            frame = self._av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
            frame.sample_rate = self._rate
            frame.time_base = Fraction(1, self._rate)
            frame.pts = self._pts
            self._pts += samples.shape[1]
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        for packet in self._stream.encode(None):  # drain the encoder's look-ahead
            self._container.mux(packet)
        self.close()  # writes the trailer
        return self._sink.take()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._container.close()


def wav_header(sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (sizes 0xFFFFFFFF, as streaming
    servers commonly write)."""
    import struct

    unknown = 0xFFFFFFFF
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", unknown)
    )

"""The OpenAI speech endpoint's audio formats: pcm, wav, mp3, opus (Ogg), aac (ADTS) and flac.

Each is encoded chunk by chunk as the engine makes audio (server/encode.py). The tests decode every
response back with PyAV (FFmpeg's decoders, independent of the encoders' muxing code paths) and
check its rate, its length against the audio the engine made, and that it is the audio that went in
(a tone's pitch survives); the encoder tests check that bytes leave with the first chunk.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from remote_server import TOKEN, LoopbackServer

from misotts_agents.audio import FRAME_SAMPLES, SAMPLE_RATE
from misotts_agents.server.encode import FORMATS, StreamEncoder

CONTENT_TYPES = {
    "pcm": "audio/pcm",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
}
# Decoded rate: Opus always decodes at 48 kHz (RFC 7845; the Ogg header keeps 24 kHz as the input rate).
DECODED_RATE = {"opus": 48_000}
# Lossy codecs add encoder delay and pad to whole frames: MP3 (576-sample granules plus the LAME
# delay) and AAC (1024-sample frames, 1024 priming samples) decode a little longer than they went in.
SLACK_S = {"mp3": 0.1, "aac": 0.1}


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """Mono float audio and its rate, decoded by FFmpeg (raw PCM is read as the endpoint documents it)."""
    import av

    if fmt == "pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767, SAMPLE_RATE
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray() for f in container.decode(stream)]
        rate = stream.codec_context.sample_rate
    if not frames:
        return np.zeros(0, np.float32), rate
    audio = np.concatenate([f.reshape(1, -1) for f in frames], axis=1)[0]  # mono: packed or planar, one row
    if audio.dtype == np.int16:
        return audio.astype(np.float32) / 32767, rate
    return audio.astype(np.float32), rate


def peak_hz(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return float(np.fft.rfftfreq(audio.size, 1 / rate)[np.argmax(spectrum)])


def tone_chunks(n: int, freq: float = 440.0) -> list[np.ndarray]:
    t = np.arange(n * FRAME_SAMPLES) / SAMPLE_RATE
    audio = (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.split(audio, n)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_decodes_back_to_the_audio_that_went_in(fmt: str) -> None:
    chunks = tone_chunks(15)  # 1.2 s in 80 ms chunks, as the engine yields them
    encoder = StreamEncoder(fmt)
    assert encoder.content_type == CONTENT_TYPES[fmt]
    parts = [encoder.encode(c) for c in chunks]
    parts.append(encoder.finish())
    # Streaming: bytes leave with the first chunk (AAC's encoder looks 1024 samples ahead, so its
    # first frame leaves with the second 80 ms chunk), and keep coming while audio goes in.
    ahead = 1 if fmt == "aac" else 0
    assert parts[ahead], f"{fmt}: nothing sent with chunk {ahead + 1}"
    assert all(parts[i] for i in range(ahead, len(chunks), 3)), [len(p) for p in parts]
    audio, rate = decode(b"".join(parts), fmt)
    assert rate == DECODED_RATE.get(fmt, SAMPLE_RATE)
    seconds = audio.size / rate
    assert 1.2 <= seconds <= 1.2 + SLACK_S.get(fmt, 0.001), f"{fmt}: {seconds:.3f} s decoded for 1.2 s"
    assert abs(peak_hz(audio, rate) - 440) < 5
    assert 0.2 < float(np.max(np.abs(audio))) < 0.6


def test_an_empty_response_still_starts_its_file() -> None:
    """A request that made no audio answers its format's header (WAV and FLAC: a valid empty file)."""
    for fmt in ("wav", "flac"):
        audio, rate = decode(StreamEncoder(fmt).finish(), fmt)
        assert audio.size == 0
        assert rate == SAMPLE_RATE
    assert StreamEncoder("opus").finish().startswith(b"OggS")
    assert StreamEncoder("mp3").finish().startswith(b"ID3")
    with pytest.raises(ValueError, match="one of pcm, wav, mp3, opus, aac, flac"):
        StreamEncoder("ogg")


def test_an_abandoned_encoder_is_released() -> None:
    encoder = StreamEncoder("mp3")
    encoder.encode(tone_chunks(1)[0])
    encoder.close()  # the client went away: no trailer, nothing left open
    encoder.close()


# -- through the server -----------------------------------------------------------------------------

FRAMES = 6  # each request: 6 frames (random tiny weights never say end-of-speech)


@pytest.fixture(scope="module")
def server(engine):
    with LoopbackServer(engine, token=TOKEN) as s:
        yield s


def speech_url(server: LoopbackServer) -> str:
    return f"http://127.0.0.1:{server.port}/v1/audio/speech"


@pytest.mark.asyncio
async def test_the_endpoint_streams_every_format(server, engine) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"model": "misotts", "input": "Hello there.", "voice": "alloy", "seed": 3, "max_audio_ms": 80 * FRAMES}
    made: dict[str, np.ndarray] = {}
    async with httpx.AsyncClient(timeout=60, headers=headers) as http:
        for fmt in FORMATS:
            async with http.stream("POST", speech_url(server), json={**body, "response_format": fmt}) as r:
                assert r.status_code == 200, await r.aread()
                assert r.headers["content-type"] == CONTENT_TYPES[fmt]
                assert "content-length" not in r.headers  # chunked: sent while it is generated
                data = b"".join([part async for part in r.aiter_bytes()])
            audio, rate = decode(data, fmt)
            assert rate == DECODED_RATE.get(fmt, SAMPLE_RATE), fmt
            seconds = audio.size / rate
            assert FRAMES * 0.08 <= seconds <= FRAMES * 0.08 + SLACK_S.get(fmt, 0.001), (fmt, seconds)
            made[fmt] = audio
        # The same seed made the same audio: the lossless formats carry it exactly.
        assert np.array_equal(made["pcm"], made["wav"])
        assert np.allclose(made["flac"], made["pcm"], atol=1 / 32767)
        bad = await http.post(speech_url(server), json={**body, "response_format": "ogg"})
        assert bad.status_code == 400
        assert "response_format" in bad.json()["error"]["message"]
        slow = await http.post(speech_url(server), json={**body, "speed": 1.5})
        assert slow.status_code == 400
        assert "speed" in slow.json()["error"]["message"]
        asked = await http.post(speech_url(server), json={**body, "response_format": "mp3", "instructions": "Cheerful"})
        assert asked.status_code == 200
        assert asked.headers["content-type"] == "audio/mpeg"
    assert engine.free_slots == engine.max_batch


@pytest.mark.asyncio
@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac"])
async def test_the_official_openai_client_gets_compressed_audio(server, fmt: str) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=TOKEN, max_retries=0)
    try:
        async with client.audio.speech.with_streaming_response.create(
            model="misotts",
            voice="alloy",
            input="Hello from the OpenAI client.",
            response_format=fmt,
            extra_body={"max_audio_ms": 80 * 4, "seed": 1},
        ) as response:
            assert response.headers["content-type"] == CONTENT_TYPES[fmt]
            data = b"".join([part async for part in response.iter_bytes()])
    finally:
        await client.close()
    audio, rate = decode(data, fmt)
    assert rate == DECODED_RATE.get(fmt, SAMPLE_RATE)
    assert 0.32 <= audio.size / rate <= 0.32 + SLACK_S.get(fmt, 0.001)

"""A voice clip uploaded from the page, as a voice prompt: any audio file the browser has (WAV, MP3,
Ogg/Opus, M4A, WebM...) decoded with PyAV to 24 kHz mono, checked for a usable length."""

from __future__ import annotations

import io

import numpy as np

from misotts_agents.audio import SAMPLE_RATE
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.errors import InvalidRequest

MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MIN_VOICE_S = 1.0
MAX_VOICE_S = 30.0  # a voice prompt is meant to be ~10 s; longer ones only cost prefill


def decode_clip(data: bytes, max_seconds: float = MAX_VOICE_S) -> np.ndarray:
    """The clip's first audio stream as 24 kHz mono float32; InvalidRequest if it is not audio."""
    import av
    from av.error import FFmpegError

    if not data:
        raise InvalidRequest("the voice clip is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise InvalidRequest(f"the voice clip is {len(data)} bytes; at most {MAX_UPLOAD_BYTES}")
    limit = int((max_seconds + 1) * SAMPLE_RATE)  # decode a little past the limit, to report it
    parts: list[np.ndarray] = []
    got = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise InvalidRequest("the voice clip has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
                    got += parts[-1].size
                if got > limit:
                    break
            else:
                parts += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except FFmpegError as exc:
        raise InvalidRequest(f"the voice clip could not be decoded: {exc}") from exc
    audio = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    seconds = audio.size / SAMPLE_RATE
    if seconds < MIN_VOICE_S or seconds > max_seconds:
        raise InvalidRequest(
            f"the voice clip is {seconds:.1f} s long; use {MIN_VOICE_S:.0f} to {max_seconds:.0f} s (about 10 s is best)"
        )
    return audio


def voice_from_upload(data: bytes, transcript: str, speaker: int) -> VoicePrompt:
    """The uploaded clip and its transcript as the agent's voice prompt."""
    if not transcript.strip():
        raise InvalidRequest("the voice clip needs its transcript (what is said in it, word for word)")
    return VoicePrompt(speaker, transcript.strip(), decode_clip(data), SAMPLE_RATE)

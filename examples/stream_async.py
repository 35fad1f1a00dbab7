"""Stream one reply asynchronously, conditioned on a voice clip and the user's last turn.

    uv run misotts-agents make-tiny out/tiny
    uv run python examples/stream_async.py --model out/tiny --out out/reply.wav

Chunks arrive while the utterance is still being generated; a real agent would play them at once.
"""

import argparse
import asyncio
import time

import numpy as np

from misotts_agents import MisoEngine, Segment, SynthesisRequest
from misotts_agents.audio import write_wav


def sine(seconds: float, freq: float, rate: int = 24_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.2 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="MisoLabs/MisoTTS")
    parser.add_argument("--out", default="reply.wav")
    args = parser.parse_args()

    engine = MisoEngine.load(args.model)
    request = SynthesisRequest(
        "No problem, I have updated your booking.",
        context=(
            Segment(0, "Hi, this is how I sound.", sine(1.0, 180)),  # the agent's voice prompt
            Segment(1, "Can you move my booking to Friday?", sine(0.8, 240), 24_000),  # the user's turn
        ),
        max_audio_ms=2_000,
        seed=1,
    )
    start, pieces = time.perf_counter(), []
    async with engine.stream(request) as stream:
        async for chunk in stream:
            print(f"{time.perf_counter() - start:6.3f} s: {chunk.frames} frames ({chunk.duration_s:.2f} s of audio)")
            pieces.append(chunk.pcm)
    write_wav(args.out, np.concatenate(pieces))
    print(f"wrote {args.out}; {stream.stats}")


if __name__ == "__main__":
    asyncio.run(main())

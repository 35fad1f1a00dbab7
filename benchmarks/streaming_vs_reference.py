"""Time to first audio and real-time factor: our streaming engine vs the reference's approach.

The reference (MisoTTS generator.py) generates every frame, then decodes the whole clip with Mimi,
then watermarks it: first audio arrives only when everything is done. The engine streams: Mimi
decodes each frame as it is generated and chunks (watermarked one by one) leave at once.

Both paths run in one process on the same model, prompt, seed and frame count, alternating runs.

    uv run python benchmarks/streaming_vs_reference.py            # tiny random checkpoint, CPU
    uv run python benchmarks/streaming_vs_reference.py --model MisoLabs/MisoTTS --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from misotts_agents.engine.miso_engine import MisoEngine
from misotts_agents.engine.request import SynthesisRequest
from misotts_agents.model import codec
from misotts_agents.model.sampling import SamplingState
from misotts_agents.testing.tiny import make_tiny

TEXT = "Thanks for calling. Let me look that up for you right away."


def reference_approach(engine: MisoEngine, mimi: torch.nn.Module, request: SynthesisRequest) -> tuple[float, int]:
    """Generate all frames, decode the whole clip, watermark it; returns (seconds, frames)."""
    start = time.perf_counter()
    model, device = engine.model, engine.device
    prompt = engine.prompts.build(request.text, request.speaker, request.context, request.max_frames)
    rows = torch.tensor([0], device=device)
    sampling = SamplingState.single(request.temperature, request.topk, request.seed, 0, device)
    frames = []
    with torch.inference_mode():
        tokens, mask = prompt.tokens.to(device)[None], prompt.mask.to(device)[None]
        pos = torch.arange(prompt.length, device=device)[None]
        for i in range(request.max_frames):
            last_h = model.backbone_last_hidden(tokens, mask, pos, rows)
            sampling.frame.fill_(i)
            codes = model.decode_frame(last_h, sampling)
            if not codes.any():
                break
            frames.append(codes)
            zero = torch.zeros(1, 1, dtype=torch.long, device=device)
            tokens = torch.cat([codes, zero], dim=1)[:, None]
            mask = torch.cat([torch.ones_like(codes, dtype=torch.bool), zero.bool()], dim=1)[:, None]
            pos = pos[:, -1:] + 1
        codes = torch.cat(frames)
        audio = codec.decode(mimi, (codes * (codes < codec.CODEBOOK_SIZE)).T)
    pcm = audio.reshape(-1).float().cpu().numpy()
    if engine.watermarker is not None:
        pcm = engine.watermarker.apply(pcm)
    return time.perf_counter() - start, len(frames)


def streaming(engine: MisoEngine, request: SynthesisRequest) -> tuple[float, float, int]:
    """Returns (time to first audio, total seconds, frames)."""
    start = time.perf_counter()
    first = None
    frames = 0
    for chunk in engine.stream(request):
        if first is None:
            first = time.perf_counter() - start
        frames += chunk.frames
    return first, time.perf_counter() - start, frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model dir or Hub repo (default: a fresh tiny random checkpoint)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--frames", type=int, default=25, help="frames per utterance (80 ms each; default 25)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--watermark",
        default="tiny",
        help="'tiny' (the model dir's own silentcipher/, random weights in a tiny checkpoint: same compute as "
        "the real one), 'none', or a SilentCipher dir/repo",
    )
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    model = args.model or make_tiny(Path(tmp.name) / "tiny")
    if args.watermark == "none":
        watermark = False
    elif args.watermark == "tiny":
        watermark = True  # the tiny checkpoint carries a random-weight SilentCipher in silentcipher/
    else:
        watermark = args.watermark
    # One stream: max_batch=1, so the engine's step is the same batch-1 work as the reference's.
    engine = MisoEngine.load(model, device=args.device, watermark=watermark, max_batch=1, progress=False)
    mimi = codec.load_mimi(model if Path(str(model)).is_dir() else None, device=engine.device)
    request = SynthesisRequest(TEXT, seed=1, max_audio_ms=80 * args.frames)

    streaming(engine, request)  # warm-up: first calls pay one-off allocation / kernel selection
    reference_approach(engine, mimi, request)
    s_first, s_total, r_total = [], [], []
    for _ in range(args.runs):
        first, total, frames = streaming(engine, request)
        s_first.append(first)
        s_total.append(total)
        ref, ref_frames = reference_approach(engine, mimi, request)
        r_total.append(ref)
        assert frames == ref_frames == args.frames, (frames, ref_frames)
    audio_s = args.frames * 0.08
    med = statistics.median
    print(f"model={model} device={engine.device} dtype={engine.model.dtype} threads={torch.get_num_threads()}")
    print(f"utterance: {args.frames} frames = {audio_s:.2f} s of audio; watermark={args.watermark}; runs={args.runs}")
    print(f"{'approach':<36}{'first audio (median)':>22}{'RTF (median)':>14}")
    print(f"{'reference: generate, decode, mark':<36}{med(r_total) * 1000:>19.0f} ms{med(r_total) / audio_s:>14.2f}")
    print(f"{'misotts-agents streaming engine':<36}{med(s_first) * 1000:>19.0f} ms{med(s_total) / audio_s:>14.2f}")
    print(f"first-audio speed-up: {med(r_total) / med(s_first):.1f}x")
    tmp.cleanup()


if __name__ == "__main__":
    main()

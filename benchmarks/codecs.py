"""Our Mimi and SilentCipher against the originals (moshi 0.2.13, silentcipher 1.0.5), one run, same weights.

Both originals are dev-only test oracles; the package runs its own (model/mimi, model/silentcipher).
With the real architectures and random weights (the cost does not depend on the values), it prints:

- Mimi, per 80 ms frame: whole-clip encode of a 10 s clip (its time / 125 frames), and streamed decode
  (one frame per row per call, moshi's streaming with its row mask against our MimiStreamDecoder) at
  batch 1 and 8;
- SilentCipher, per second of 24 kHz audio through the watermarker (resampling included): one
  stream marked with ``Watermarker.apply`` (ours) and the package's ``encode_wav`` through the same
  resampling; then 8 streams' 80 ms chunks, one batched call against one call per chunk.

Where an original is not installed (a lent GPU carries only the package's own needs) its column says so.

    uv run python benchmarks/codecs.py                   # CPU, 2 threads (about a minute)
    uv run python benchmarks/codecs.py --device cuda     # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from misotts_agents.audio import FRAME_SAMPLES, SAMPLE_RATE
from misotts_agents.model.codec import CODEBOOK_SIZE, NUM_CODEBOOKS
from misotts_agents.model.mimi import default_config
from misotts_agents.model.mimi_stream import MimiStreamDecoder
from misotts_agents.model.watermark import WATERMARK_MESSAGE_SDR, WATERMARK_SAMPLE_RATE, Watermarker, _resample
from misotts_agents.testing.mimi import random_mimi_model
from misotts_agents.testing.silentcipher import make_tiny_silentcipher


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


# (name, our seconds, the original's seconds or None where the oracle is not installed, e.g. on a lent GPU)
Row = tuple[str, float, float | None]


def mimi_rows(device: torch.device, frames: int) -> list[Row]:
    ours = random_mimi_model(default_config(), device, seed=0)
    theirs = None
    if find_spec("moshi") is not None:
        from moshi.models import loaders

        theirs = loaders.get_mimi(None, mimi_config=default_config(), device=device, num_codebooks=NUM_CODEBOOKS)
        theirs.load_state_dict(ours.state_dict())
        theirs.eval()
    clip = torch.randn(1, 1, 10 * SAMPLE_RATE, generator=torch.Generator().manual_seed(0)).to(device) * 0.1
    clip_frames = 10 * SAMPLE_RATE // FRAME_SAMPLES
    with torch.inference_mode():
        rows: list[Row] = [
            (
                "encode, 10 s clip, per frame",
                timed(lambda: ours.encode(clip), 3, device) / clip_frames,
                None if theirs is None else timed(lambda: theirs.encode(clip), 3, device) / clip_frames,
            )
        ]
    for batch in (1, 8):
        codes = torch.randint(0, CODEBOOK_SIZE, (frames, batch, NUM_CODEBOOKS), generator=torch.Generator())
        codes = codes.to(device)
        decoder = MimiStreamDecoder(ours, batch_size=batch)
        decoder.warm_up()

        def run_ours(decoder: MimiStreamDecoder = decoder, codes: torch.Tensor = codes) -> None:
            decoder.reset()
            for frame in codes:
                decoder.decode(frame, validate=False)

        def run_theirs(codes: torch.Tensor = codes, batch: int = batch) -> None:
            assert theirs is not None
            with theirs.streaming(batch):
                for frame in codes:
                    theirs.decode(frame[:, :, None])

        with torch.inference_mode():
            dec_ours = timed(run_ours, 3, device) / frames
            dec_theirs = None if theirs is None else timed(run_theirs, 3, device) / frames
        rows.append((f"streamed decode, batch {batch}, per frame", dec_ours, dec_theirs))
        decoder.close()
    return rows


def watermark_rows(device: torch.device, seconds: float) -> list[Row]:
    directory = make_tiny_silentcipher(Path(tempfile.mkdtemp()) / "silentcipher")
    ours = Watermarker.load(directory, device=str(device))
    package = None
    if find_spec("silentcipher") is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydub's missing-ffmpeg warning at import
            import silentcipher

        package = silentcipher.get_model(
            model_type="44.1k",
            ckpt_path=str(directory),
            config_path=str(directory / "hparams.yaml"),
            device=str(device),
        )

    def package_apply(x: np.ndarray) -> np.ndarray:
        """The package's marking through the same resampling as ``Watermarker.apply``."""
        assert package is not None
        y44 = _resample(x.astype(np.float64), SAMPLE_RATE, WATERMARK_SAMPLE_RATE)
        marked, _ = package.encode_wav(
            y44,
            WATERMARK_SAMPLE_RATE,
            list(ours.key),
            message_sdr=WATERMARK_MESSAGE_SDR,
            calc_sdr=False,
            disable_checks=True,
        )
        return _resample(np.asarray(marked) - y44, WATERMARK_SAMPLE_RATE, SAMPLE_RATE)

    rng = np.random.default_rng(0)
    speech = (rng.standard_normal(int(seconds * SAMPLE_RATE)) * 0.1).astype(np.float32)
    chunks = [speech[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES] for i in range(8)]
    chunk_seconds = 8 * FRAME_SAMPLES / SAMPLE_RATE
    one_package = None if package is None else timed(lambda: package_apply(speech), 3, device) / seconds
    chunks_package = None if package is None else timed(lambda: [package_apply(c) for c in chunks], 5, device)
    per_second = None if chunks_package is None else chunks_package / chunk_seconds
    return [
        (
            f"one stream, {seconds:g} s clip, per audio second",
            timed(lambda: ours.apply(speech), 3, device) / seconds,
            one_package,
        ),
        (
            "8 streams' 80 ms chunks, one batched call, per audio second",
            timed(lambda: ours.apply_batch(chunks), 5, device) / chunk_seconds,
            per_second,
        ),
        (
            "8 streams' 80 ms chunks, one call each, per audio second",
            timed(lambda: [ours.apply(c) for c in chunks], 5, device) / chunk_seconds,
            per_second,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default: 2)")
    parser.add_argument("--frames", type=int, default=25, help="streamed frames per decode measurement")
    parser.add_argument("--seconds", type=float, default=4.0, help="clip length for the one-stream watermark")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'measurement':<62} {'ours ms':>9} {'original ms':>12} {'ratio':>6}")
    for title, rows in (
        ("Mimi", mimi_rows(device, args.frames)),
        ("SilentCipher", watermark_rows(device, args.seconds)),
    ):
        print(title)
        for name, ours, theirs in rows:
            if theirs is None:
                print(f"  {name:<60} {ours * 1e3:9.2f} {'(absent)':>12}")
            else:
                print(f"  {name:<60} {ours * 1e3:9.2f} {theirs * 1e3:12.2f} {theirs / ours:5.1f}x")


if __name__ == "__main__":
    main()

"""The streamed watermark against the whole-clip one, and what marking an engine step costs; one run.

1. **Agreement.** For utterances of 2-10 s, the residual (marked - unmarked) of the utterance marked
   as it streams is compared with the residual of marking the whole utterance at once (Pearson
   correlation over the samples; 1.0 is the whole-clip mark itself), for the engine's default chunk
   schedule (1, 2, 4 ... 25 frames) and for 80 ms chunks, three ways: each chunk marked on its own
   (the baseline: what the engine did before), streamed with its utterance's context
   (model/watermark_stream.py, the default 1 s of left context), and the same with 2 s.
2. **Cost per engine step.** N streams (1, 8, 32) each hand one 80 ms chunk to the watermarker in
   a step, as their first chunk (no context yet) and later on (1 s of context): one batched
   ``mark_streams`` call for all of them against one call per stream, in milliseconds and as a
   multiple of the step's 80 ms real-time budget (above 1x: marking is slower than real time).
3. **Detection** (only with ``--silentcipher DIR``, the real ``sony/silentcipher`` 44.1 kHz weights):
   the detector's message and confidence on the streamed and the whole-clip marked audio.

With the make-tiny SilentCipher (the real architecture, random weights; the default here) the
agreement figures say how close the streamed computation is to the whole-clip one; they say nothing
about whether the real detector finds the mark.

    uv run python benchmarks/watermark_streaming.py                 # CPU, 2 threads (several minutes)
    uv run python benchmarks/watermark_streaming.py --silentcipher ~/silentcipher/44_1_khz/73999_iteration
    uv run python benchmarks/watermark_streaming.py --device cuda --levels 1,8,32,64
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from misotts_agents.audio import FRAME_SAMPLES, SAMPLE_RATE
from misotts_agents.engine.request import ChunkSchedule
from misotts_agents.model.watermark import Watermarker, _resample
from misotts_agents.model.watermark_stream import StreamWatermarker
from misotts_agents.testing.silentcipher import make_tiny_silentcipher

SENTENCES = [
    "Thanks for calling. I can help you with that order right away.",
    "I hear you, and I am sorry it took so long. Let me check where the parcel is now, and I will "
    "tell you exactly when it arrives.",
    "Of course. Your appointment is moved to Thursday at four in the afternoon, and you will get a "
    "confirmation by text message in a minute or two. Is there anything else I can do today?",
]


def utterances(seconds: list[float]) -> list[tuple[str, np.ndarray]]:
    """Speech at 24 kHz: espeak-ng's voice when installed (cut to each length), else a synthetic
    gliding-harmonics voice (said in the label)."""
    out = []
    espeak = shutil.which("espeak-ng")
    for i, length in enumerate(seconds):
        n = round(length * SAMPLE_RATE)
        if espeak is not None:
            import soundfile as sf

            wav = Path(tempfile.mkdtemp()) / "speech.wav"
            text = " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(4))
            subprocess.run([espeak, "-w", str(wav), text], check=True)
            data, rate = sf.read(str(wav), dtype="float64")
            speech = _resample(data, int(rate), SAMPLE_RATE)[:n] * 0.8
            out.append((f"espeak {length:g} s", speech.astype(np.float32)))
            continue
        t = np.arange(n) / SAMPLE_RATE
        phase = 2 * np.pi * np.cumsum(130 + 25 * np.sin(2 * np.pi * 0.6 * t + i)) / SAMPLE_RATE
        voice = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.55 + 0.45 * np.sin(2 * np.pi * 3.3 * t))
        out.append((f"synthetic {length:g} s", (0.15 * voice).astype(np.float32)))
    return out


def cut(audio: np.ndarray, sizes: Iterator[int]) -> list[np.ndarray]:
    """``audio`` in chunks of the given frame counts (the last one short)."""
    chunks, start = [], 0
    while start < audio.size:
        n = next(sizes) * FRAME_SAMPLES
        chunks.append(audio[start : start + n])
        start += n
    return chunks


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def agreement(marker: Watermarker, seconds: list[float]) -> None:
    print("1. agreement with the whole-clip mark (correlation of residuals)")
    print(f"   {'utterance':<18} {'schedule':<9} {'own chunks':>10} {'streamed 1 s':>12} {'streamed 2 s':>12}")
    for label, speech in utterances(seconds):
        whole = marker.apply(speech) - speech
        for schedule in ("default", "80 ms"):
            sizes = ChunkSchedule().sizes if schedule == "default" else lambda: iter(lambda: 1, 0)
            chunks = cut(speech, sizes())
            alone = np.concatenate([marker.apply(c) for c in chunks]) - speech
            streamed = []
            for context in (1.0, 2.0):
                state = StreamWatermarker(marker, context_s=context)
                streamed.append(correlation(np.concatenate([state.process(c) for c in chunks]) - speech, whole))
            before = correlation(alone, whole)
            print(f"   {label:<18} {schedule:<9} {before:10.3f} {streamed[0]:12.3f} {streamed[1]:12.3f}")


def step_cost(marker: Watermarker, levels: list[int], device: torch.device) -> None:
    print("2. marking one engine step: every stream's next 80 ms chunk")
    header = ("streams", "context", "batched ms", "one at a time ms", "ratio", "per 80 ms step")
    print("   " + " ".join(f"{h:>{w}}" for h, w in zip(header, (7, 8, 11, 17, 6, 15), strict=True)))
    speech = utterances([2.0])[0][1]
    context, chunk = speech[:SAMPLE_RATE], speech[SAMPLE_RATE : SAMPLE_RATE + FRAME_SAMPLES]

    def fresh(n: int, warm: bool) -> list[StreamWatermarker]:
        states = [StreamWatermarker(marker) for _ in range(n)]
        for state in states if warm else ():  # a second of the utterance already marked: full context
            state.process(context)
        return states

    def timed(run: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - began

    fresh(1, True)[0].process(chunk)  # warm-up
    for n in levels:
        for warm, label in ((False, "none"), (True, "1 s")):
            states = fresh(n, warm)
            batched = timed(lambda states=states: marker.mark_streams([(s, chunk) for s in states]))
            states = fresh(n, warm)
            alone = timed(lambda states=states: [marker.mark_streams([(s, chunk)]) for s in states])
            print(
                f"   {n:7d} {label:>8} {batched * 1e3:11.1f} {alone * 1e3:17.1f} {alone / batched:5.1f}x"
                f" {batched / 0.08:14.1f}x"
            )


def detection(marker: Watermarker, seconds: list[float]) -> None:
    print("3. detection with these weights (message, confidence): streamed vs whole clip")
    for label, speech in utterances(seconds):
        whole = marker.detect(marker.apply(speech), SAMPLE_RATE)
        state = StreamWatermarker(marker)
        streamed_audio = np.concatenate([state.process(c) for c in cut(speech, ChunkSchedule().sizes())])
        streamed = marker.detect(streamed_audio, SAMPLE_RATE)
        print(f"   {label:<18} whole: {whole.detected} {whole.message} {whole.confidence}")
        print(f"   {'':<18} streamed: {streamed.detected} {streamed.message} {streamed.confidence}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--silentcipher", type=Path, help="the real 44.1 kHz weights (default: make-tiny's, random)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", default="2,4,6,10", help="utterance lengths for the agreement table")
    parser.add_argument("--levels", default="1,8,32", help="streams per step for the cost table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    source = args.silentcipher or make_tiny_silentcipher(Path(tempfile.mkdtemp()) / "silentcipher")
    marker = Watermarker.load(source, device=str(device))
    weights = "real weights" if args.silentcipher else "make-tiny weights (random: agreement only, no detection)"
    print(f"SilentCipher from {source} ({weights}); device {device}, {torch.get_num_threads()} threads")
    seconds = [float(s) for s in args.seconds.split(",")]
    agreement(marker, seconds)
    step_cost(marker, [int(n) for n in args.levels.split(",")], device)
    if args.silentcipher:
        detection(marker, seconds)
    else:
        print("3. detection: not run (pass --silentcipher with the real weights)")


if __name__ == "__main__":
    main()

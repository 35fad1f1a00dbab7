"""Word error rate of the same prompts spoken with bf16 and with int8 weights: the check on real weights.

benchmarks/quantization.py measures how far int8 moves the logits of *random* weights; whether the
speech stays as intelligible is a question for the real checkpoint. This script speaks each prompt
with every ``--weights`` format in turn (same seed; one engine at a time, closed before the next,
so one GPU holds one model; no watermark), transcribes the audio with a local Whisper --
openai-whisper, faster-whisper or a transformers ASR pipeline, whichever is importable -- and
prints, per prompt and format, the audio length and the word error rate against the prompt's text
(jiwer when installed, else the word-level edit distance below), then each format's corpus WER.
A GPU run of the 8B model; not part of the test suite (its WER function is tested).

    uv run python scripts/quantization_wer.py --model MisoLabs/MisoTTS --whisper large-v3
    uv run python scripts/quantization_wer.py --model ./misotts-int8 --weights int8 --prompts prompts.txt
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

PROMPTS = (
    "Thanks for calling, how can I help you today?",
    "Your order shipped on Monday and should arrive by Thursday afternoon.",
    "I'm sorry about the delay; let me check what happened with the courier.",
    "The meeting moved to half past three in the second floor conference room.",
    "Could you spell your last name for me, please?",
    "We have two rooms left: a double with a sea view and a single at the back.",
    "Please hold the line while I transfer you to a specialist.",
    "That comes to forty-two dollars and fifteen cents, including tax.",
)
ASR_RATE = 16_000
Transcriber = Callable[[np.ndarray], str]


def words(text: str) -> list[str]:
    """Lower-case words without punctuation (apostrophes and hyphens inside words kept)."""
    return re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*", text.lower())


def word_edits(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words): Levenshtein distance over words."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[-1], len(ref)


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER of ``hypothesis`` against ``reference`` after :func:`words` (jiwer's when installed)."""
    if not words(reference):
        return float(bool(words(hypothesis)))
    if importlib.util.find_spec("jiwer") is not None:
        import jiwer

        return float(jiwer.wer(" ".join(words(reference)), " ".join(words(hypothesis))))
    edits, total = word_edits(reference, hypothesis)
    return edits / max(total, 1)


def load_transcriber(name: str, device: str) -> Transcriber:
    """A local Whisper taking 16 kHz float audio, from the first importable package."""
    if importlib.util.find_spec("whisper") is not None:
        import whisper

        model = whisper.load_model(name, device=device)
        return lambda audio: str(model.transcribe(audio.astype(np.float32))["text"])
    if importlib.util.find_spec("faster_whisper") is not None:
        from faster_whisper import WhisperModel

        fw = WhisperModel(name, device="cuda" if device.startswith("cuda") else "cpu")
        return lambda audio: " ".join(s.text for s in fw.transcribe(audio.astype(np.float32))[0])
    if importlib.util.find_spec("transformers") is not None:
        from transformers import pipeline

        asr = pipeline("automatic-speech-recognition", model=name, device=device)
        return lambda audio: str(asr({"raw": audio.astype(np.float32), "sampling_rate": ASR_RATE})["text"])
    raise SystemExit("error: no Whisper to transcribe with: install openai-whisper, faster-whisper or transformers")


def speak(model: str, weights: str, prompts: list[str], device: str | None, seed: int, max_ms: float) -> list:
    """Each prompt's 24 kHz audio from one engine with ``weights``, closed afterwards."""
    import torch

    from misotts_agents.engine.miso_engine import MisoEngine
    from misotts_agents.engine.request import SynthesisRequest
    from misotts_agents.model.config import parse_weights

    engine = MisoEngine.load(model, device=device, watermark=False, weights=parse_weights(weights), max_batch=1)
    try:
        return [engine.synthesize(SynthesisRequest(p, seed=seed, max_audio_ms=max_ms)).pcm for p in prompts]
    finally:
        engine.close()
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="MisoLabs/MisoTTS", help="checkpoint directory or Hub repo id")
    parser.add_argument("--weights", default="bf16,int8", help="formats to compare, comma-separated (bf16,int8,fp8)")
    parser.add_argument("--whisper", default="base.en", help="Whisper model name or path for the chosen package")
    parser.add_argument("--prompts", type=Path, help="a text file, one prompt a line (default: 8 built-in ones)")
    parser.add_argument("--device", default=None, help="engine device (default: cuda when present)")
    parser.add_argument("--asr-device", default="cpu", help="Whisper's device (default: cpu, beside the model)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-ms", type=float, default=20_000, help="longest audio per prompt")
    args = parser.parse_args(argv)
    prompts = [p.strip() for p in args.prompts.read_text().splitlines() if p.strip()] if args.prompts else PROMPTS
    formats = args.weights.split(",")
    audio = {w: speak(args.model, w, list(prompts), args.device, args.seed, args.max_ms) for w in formats}
    import soxr

    transcribe = load_transcriber(args.whisper, args.asr_device)
    totals = {w: [0, 0] for w in formats}
    print("| # | " + " | ".join(f"{w} s | {w} WER" for w in formats) + " | prompt |")
    print("|---|" + "---|---|" * len(formats) + "---|")
    for i, prompt in enumerate(prompts):
        cells = []
        for w in formats:
            pcm = audio[w][i]
            heard = transcribe(soxr.resample(pcm, 24_000, ASR_RATE))
            edits, count = word_edits(prompt, heard)
            totals[w][0] += edits
            totals[w][1] += count
            cells.append(f"{pcm.size / 24_000:.2f} | {word_error_rate(prompt, heard):.3f}")
        print(f"| {i + 1} | " + " | ".join(cells) + f" | {prompt} |")
    for w, (edits, count) in totals.items():
        print(f"{w}: corpus WER {edits / max(count, 1):.3f} ({edits} word edits / {count} words)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

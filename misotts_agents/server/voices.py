"""A server's named voices from ``NAME=CLIP`` specs: what ``serve --voice`` and each Ray Serve
engine replica load, in one place below both."""

from __future__ import annotations

from pathlib import Path

from misotts_agents.audio import read_audio
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.errors import MisoError


def named_voices(specs: list[str]) -> dict[str, VoicePrompt]:
    """``NAME=CLIP`` specs as voice prompts; each clip's transcript is the .txt file beside it.
    Raises ValueError naming the spec at fault."""
    voices = {}
    for spec in specs:
        name, sep, clip = spec.partition("=")
        if not sep or not name or not clip:
            raise ValueError(f"--voice {spec!r}: expected NAME=CLIP (e.g. anna=voices/anna.wav)")
        transcript = Path(clip).with_suffix(".txt")
        if not transcript.is_file():
            raise ValueError(f"--voice {name}: no transcript {transcript} beside the clip")
        try:
            voices[name] = VoicePrompt(0, transcript.read_text().strip(), read_audio(clip))
        except MisoError as exc:
            raise ValueError(f"--voice {name}: {exc}") from None
    return voices

"""The offline responder's words: what the demo answers when no language model is configured.

A template, not understanding: it repeats what it heard when there is a transcript, otherwise says how
long the user spoke (the placeholder transcripts of :class:`PlaceholderSTTService`)."""

from __future__ import annotations

import re

PLACEHOLDER_RE = re.compile(r"\(user spoke for ([0-9.]+) s\)")


def placeholder_transcript(seconds: float) -> str:
    """The transcript of a turn when no speech recognizer runs (read back by :func:`scripted_reply`)."""
    return f"(user spoke for {seconds:.1f} s)"


def scripted_reply(user_text: str, turn: int) -> str:
    """The offline responder's answer to one user turn (a template, not understanding)."""
    # One turn can hold several VAD segments, each with its own placeholder transcript.
    pieces = PLACEHOLDER_RE.findall(user_text)
    if pieces and not PLACEHOLDER_RE.sub("", user_text).strip():
        seconds = sum(float(p) for p in pieces)
        replies = (
            f"I heard you speak for {seconds:.1f} seconds. I can't make out words without a speech "
            "recognizer, but I am answering in a tone that follows yours.",
            "Thanks! My reply is conditioned on the sound of what you just said.",
            f"That was about {seconds:.0f} seconds of speech. Try a different mood and listen to how I answer.",
        )
        return replies[turn % len(replies)]
    text = " ".join(user_text.split())
    if len(text) > 200:
        text = text[:200].rsplit(" ", 1)[0] + "..."
    return f"You said: {text}" if text else "I didn't catch that."

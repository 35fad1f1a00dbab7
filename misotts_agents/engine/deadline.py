"""Playout deadlines: how long prefill may hold the device before a speaking stream's listener
would run out of audio.

A stream that generates faster than real time is ahead of its listener: the audio it has handed
out and not yet played is its *slack*, less the time its next chunk still needs (frames still to
generate times the frame step's time). Prefill for joiners delays every speaking stream's next
chunk by the pass's time, so one iteration may spend ``min(slack) - floor`` seconds on prefill
without any listener's buffer falling below ``floor`` (:data:`SLACK_FLOOR_S`, two frames by
default). Each pass is sized to three quarters (:data:`LEND_SHARE`) of what is left of that once
the iteration's earlier passes are paid (``spent_s``), as a pass or a step can take longer than
its prediction: the margin shrinks as the passes go, and the slack is spent within the iteration,
before the joiners that reach their first frame in it become speakers with no audio in hand
(which lend nothing until their own listeners are a floor ahead). A speaking stream that has not
handed out its first chunk has no slack (it is urgent: its first audio waits), and neither has one
whose listener is about to run out: then the prefill budget's own share applies (prefill.py), as
before deadlines were known.
"""

from __future__ import annotations

from collections.abc import Iterable

from misotts_agents.audio import FRAME_S
from misotts_agents.engine.stream import SpeechStream

SLACK_FLOOR_S = 2 * FRAME_S  # the audio a listener always keeps in hand while joiners prefill
LEND_SHARE = 0.75  # of the slack above the floor: passes and steps take longer than predicted at times


def slack_s(stream: SpeechStream, now: float, step_s: float) -> float | None:
    """Seconds the stream's listener can wait beyond its next chunk's arrival; None before its
    first chunk (no audio yet: urgent)."""
    if stream.first_chunk_at is None:
        return None
    ahead = stream.delivered_frames * FRAME_S - stream.played_s(now)
    return ahead - stream.frames_to_next_chunk * step_s


def lendable_s(streams: Iterable[SpeechStream], now: float, step_s: float, floor_s: float = SLACK_FLOOR_S) -> float:
    """Seconds of the speaking ``streams``' slack above the floor at ``now`` (0: none has slack to
    spare, or one has no audio yet); infinite when none speaks. An iteration measures it once."""
    lendable = float("inf")
    for stream in streams:
        slack = slack_s(stream, now, step_s)
        if slack is None:
            return 0.0
        lendable = min(lendable, slack - floor_s)
    return max(lendable, 0.0)


def prefill_allowance_s(lendable: float, spent_s: float = 0.0) -> float:
    """Seconds the next prefill pass may take: three quarters of the ``lendable`` slack that the
    iteration's earlier passes (``spent_s``) left."""
    return max(lendable - spent_s, 0.0) * LEND_SHARE

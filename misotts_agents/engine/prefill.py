"""Chunked, batched prefill: how joiners' prompts reach their cache rows without stalling the
streams already speaking.

A request's prompt (voice prompt, the user's last turn as audio, recent turns: up to ~2,000
positions) must be in its KV-cache row before its first frame step. Prefilled whole between two
frame steps it stalls every stream already speaking for the whole prefill, and several joiners
queue one whole prefill per step. So the scheduler runs, each iteration before the frame step, one
bounded prefill *pass*: one batched forward of several joiners' next chunks.

What goes into a pass (:func:`plan_pass`). Candidates are ordered by fewest remaining positions,
then arrival (shortest remaining first: the joiner nearest its first audio gets there first, which
minimises the joiners' mean wait; a long prompt still advances whenever its chunk fits beside the
short ones, and the short ones leave the queue after one pass). A pass is ``n`` rows of ``width``
positions, each row its own cache row and positions; shorter chunks are padded at their end with
masked-out frames. Its cost, ``n * width`` padded positions, is what the budget bounds: the first
candidate takes ``min(remaining, budget)``, the next ones join while ``n * width`` stays within it.
Equal-length joiners therefore share a pass when their remainders fit together, and a pass never
pads more than the budget. The padding's cache writes land after the row's filled positions, where
nothing reads them before the row's own later writes replace them (every call writes a position
before it attends to it); widths are limited so that no padded position passes the cache's end.

How big a pass is (:class:`PrefillBudget`), the trade between the speaking streams' smoothness
(an iteration is one pass plus one frame step, so the gap between two chunks of a speaking stream
is about ``step + pass``) and the joiners' first audio (the share of the device prefill gets is
``pass / (step + pass)``):

- Nobody speaking (no row in the frame step): nothing to stall. A pass takes up to
  :data:`MAX_PASS_POSITIONS` (the activation memory of one forward), so a burst of joiners on an
  idle engine is prefilled together and a lone joiner's prompt in one piece (its first audio is
  exactly as before chunking).
- ``"auto"`` (the default): each pass is sized, from the measured time of recent frame steps and
  of recent passes per position on this device (a feedback: a pass that took longer than its
  target makes the next one smaller), to take the frame's spare time, ``ITERATION_TARGET_S - step``
  (an iteration fits in 80% of an 80 ms frame, so the speaking streams stay real time during joins),
  or, when it is more, what the speaking streams' playout slack lends (``allowance_s``, deadline.py).
  Only when a step alone overruns the frame (no schedule keeps the streams real time) does prefill
  take one step's time, half of the device, so joiners are not starved by streams that stall
  anyway. That is judged on the median of the last :data:`OVERRUN_WINDOW` steps, not on their
  running mean: one slow step (a page fault, another process) near the frame's length would
  otherwise hand prefill a whole step each iteration and take the speakers' audio with it.
  On a GPU this needs no setting: the 8B prefill runs at roughly 20-30 us per position on an H100
  (an estimate: ~15 GFLOP per position at 500-700 TFLOP/s, not measured here), so with a frame
  step of ~25 ms at the target stream count a pass takes ~40 ms, about 1,500 positions, and a
  ~2,000-position joiner waits two iterations, none of which exceeds the frame.
- An integer N: at most N padded positions per pass while anyone speaks (deterministic chunking;
  pick N from the device's prefill rate: N * seconds-per-position ~ the frame step's time).
- ``0`` or ``None``: whole prompts, one request per iteration while others speak (the schedule
  before chunking, kept to compare against).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import torch

from misotts_agents.audio import FRAME_S
from misotts_agents.engine.device import to_device
from misotts_agents.model.config import Flavor

PrefillChunk = int | Literal["auto"] | None

ITERATION_TARGET_S = 0.8 * FRAME_S  # one frame step + one pass, with 20% of a frame to spare
MAX_PASS_POSITIONS = 4096  # padded positions per pass (embeddings of 33 columns dominate its memory)
MIN_AUTO_POSITIONS = 16  # "auto" never starves joiners, however slow the step
FIRST_AUTO_POSITIONS = 256  # "auto" before any pass was measured
OVERRUN_WINDOW = 9  # recent frame steps whose median says whether a step alone overruns the frame


def parse_prefill_chunk(value: object) -> PrefillChunk:
    """Validate a ``prefill_chunk`` setting: "auto", a non-negative int (0 = whole prompts) or None."""
    if value is None or value == "auto":
        return value  # type: ignore[return-value]
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"prefill_chunk must be 'auto' or a number of positions, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"prefill_chunk must be 'auto', 0 (whole prompts) or a positive integer, got {value!r}")
    return value


def context_scale(flavor: Flavor) -> float:
    """The context length at which a position's attention costs as much as its projections and MLP.

    Per layer and position the linear layers cost ``2 * d * (2d + 2 * kv_dim + 3 * ff)`` FLOPs and
    attention ``4 * d`` per position attended to. A position attending to ``c`` others therefore costs
    ``1 + c / scale`` times a position attending to none: about 26,600 for the 8B backbone (attention
    adds ~7% at 2,000 positions) but a few hundred for a tiny test flavor, where the late chunks of a
    long prompt cost several times its early ones.
    """
    kv_dim = flavor.num_kv_heads * flavor.head_dim
    return (2 * flavor.embed_dim + 2 * kv_dim + 3 * flavor.intermediate_dim) / 2


class PrefillBudget:
    """How many padded positions the next prefill pass may take (see the module docstring).

    Costs are learnt per *work unit*: a position attending to ``c`` earlier positions is
    ``1 + c / context_scale`` units (:func:`context_scale`), so a pass deep into a long prompt is
    sized smaller than one at its start, and its time is predicted, not learnt late by the feedback.
    """

    def __init__(self, setting: PrefillChunk = "auto", context_scale: float = math.inf) -> None:
        self.setting = parse_prefill_chunk(setting)
        self.context_scale = context_scale
        self._step_s: float | None = None  # recent frame steps' time
        self._recent_steps: deque[float] = deque(maxlen=OVERRUN_WINDOW)
        self._unit_s: float | None = None  # recent passes' time per work unit

    @property
    def whole_prompts(self) -> bool:
        """The schedule before chunking: one whole prompt per iteration while others speak."""
        return not self.setting

    def observe_step(self, seconds: float) -> None:
        self._step_s = seconds if self._step_s is None else 0.8 * self._step_s + 0.2 * seconds
        self._recent_steps.append(seconds)

    @property
    def overrun(self) -> bool:
        """Whether frame steps alone take longer than the frame (most of the recent ones)."""
        return bool(self._recent_steps) and statistics.median(self._recent_steps) >= FRAME_S

    def observe_pass(self, positions: int, seconds: float, context: float = 0.0) -> None:
        """A pass of ``positions`` padded positions attending on average to ``context`` positions took
        ``seconds``. Mostly the latest passes count: the next pass is sized from what passes of about
        its size cost, so a fixed cost per pass (a GPU reading the weights once per pass) is found by
        the feedback itself: sizes settle where ``fixed + per_unit * units`` meets the target."""
        cost = seconds / max(positions * (1 + context / self.context_scale), 1e-9)
        self._unit_s = cost if self._unit_s is None else 0.5 * self._unit_s + 0.5 * cost

    @property
    def step_s(self) -> float:
        """Recent frame steps' time (0 before any was measured)."""
        return self._step_s or 0.0

    def cost_s(self, positions: int, context: float = 0.0) -> float | None:
        """Predicted seconds of a pass of ``positions`` at ``context`` (None before any pass was measured)."""
        if self._unit_s is None:
            return None
        return positions * (1 + context / self.context_scale) * self._unit_s

    def positions(self, speaking: bool, filled: int = 0, allowance_s: float = 0.0, share: bool = True) -> int | None:
        """Padded positions for the next pass, whose rows already hold up to ``filled`` positions;
        None: unbounded (whole prompts). ``allowance_s``: the seconds the speaking streams' slack
        lends beyond the budget's own share ("auto" only: deadline.py); ``share=False``: only those
        (a later pass of the iteration: the share went to its first)."""
        if self.whole_prompts:
            return None
        if not speaking:
            return max(MAX_PASS_POSITIONS, self.setting if isinstance(self.setting, int) else 0)
        if isinstance(self.setting, int):
            return self.setting
        if self._step_s is None or self._unit_s is None:
            return FIRST_AUTO_POSITIONS
        step = self._step_s
        own = step if self.overrun else ITERATION_TARGET_S - step  # half the device, or the frame's spare
        target = max(own, allowance_s) if share else allowance_s
        units = target / max(self._unit_s, 1e-9)
        # n positions at context filled + n/2 (conservative: as if one row): n * (1 + (filled + n/2) / S) = units
        a, b = 0.5 / self.context_scale, 1 + filled / self.context_scale
        n = units / b if a == 0 else (math.sqrt(b * b + 4 * a * units) - b) / (2 * a)
        return min(MAX_PASS_POSITIONS, max(MIN_AUTO_POSITIONS, int(n)))


K = TypeVar("K")


@dataclass(frozen=True)
class Candidate(Generic[K]):
    """A row that can take part in the next pass."""

    key: K  # the caller's handle, returned in the plan
    filled: int  # positions already in the row
    stop: int  # this pass may fill up to here (the prompt's end, or the voice prefix's end)
    remaining: int  # positions left before the row's first frame step (its priority)
    order: int  # arrival (ties)


def plan_pass(
    candidates: Sequence[Candidate[K]], budget: int | None, max_len: int, max_rows: int | None = None
) -> tuple[list[tuple[Candidate[K], int]], int]:
    """Rows and chunk lengths of one pass, and its width; ``budget`` bounds rows * width."""
    plan: list[tuple[Candidate[K], int]] = []
    width, limit = 0, max_len
    for cand in sorted(candidates, key=lambda c: (c.remaining, c.order)):
        if max_rows is not None and len(plan) >= max_rows:
            break
        room = min(limit, max_len - cand.filled)  # padded positions must stay inside the cache
        if budget is not None:
            room = min(room, budget // (len(plan) + 1))
        if room < max(width, 1):
            break
        chunk = min(cand.stop - cand.filled, room)
        if chunk < 1:
            continue
        plan.append((cand, chunk))
        width = max(width, chunk)
        limit = min(limit, max_len - cand.filled)
    return plan, width


def pass_inputs(
    chunks: Sequence[tuple[torch.Tensor, torch.Tensor, int, int]], width: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded (tokens, mask, positions) of a pass from (prompt tokens, prompt mask, start, length) per row.

    Padding frames are all-masked (zero embedding) at the positions following the chunk.
    """
    n, columns = len(chunks), chunks[0][0].size(1)
    tokens = torch.zeros(n, width, columns, dtype=torch.long)
    mask = torch.zeros(n, width, columns, dtype=torch.bool)
    pos = torch.empty(n, width, dtype=torch.long)
    for i, (prompt_tokens, prompt_mask, start, length) in enumerate(chunks):
        tokens[i, :length] = prompt_tokens[start : start + length]
        mask[i, :length] = prompt_mask[start : start + length]
        pos[i] = torch.arange(start, start + width)
    return to_device(tokens, device), to_device(mask, device), to_device(pos, device)  # queued: no wait

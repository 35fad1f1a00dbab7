"""Sampling parameters: declared once, here, and used by the request, the step, both integrations,
the server protocol and the CLI.

Pure Python (no torch): the server's client and the integrations' option checks import it without
loading the model. Adding an option means adding a field here (with its bounds in ``_check``), a
per-row tensor in :class:`misotts_agents.model.sampling.SamplingState`, and using it in
``sample_topk``; every other layer reads :func:`sampling_fields`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from misotts_agents.errors import InvalidRequest

# The model's audio vocabulary (32 codebooks x 2051 ids): a larger top-k keeps every token anyway.
MAX_TOPK = 2051
# Logits divided by more than this are flat to float32 precision: a larger value is a mistake, not a choice.
MAX_TEMPERATURE = 100.0
# Seeds are hashed as two 32-bit halves of an int64 row tensor.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How the next codes are drawn: top-k filter, then a temperature-scaled draw keyed by ``seed``.

    ``topk=1`` is greedy (the reference's argmax exactly). ``seed=None`` picks a fresh random seed per
    request, reported in its stats; a fixed seed gives the same audio alone or in any batch.
    """

    temperature: float = 0.9
    topk: int = 50
    seed: int | None = None

    def __post_init__(self) -> None:
        _check(self)

    def sampling(self) -> SamplingParams:
        """Just the sampling parameters (a request is also a SamplingParams)."""
        return SamplingParams(**{f.name: getattr(self, f.name) for f in sampling_fields()})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(p: SamplingParams) -> None:
    t = p.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t <= MAX_TEMPERATURE and math.isfinite(t)):
        raise InvalidRequest(f"temperature must be a number in (0, {MAX_TEMPERATURE:g}], got {t!r}")
    if not _is_int(p.topk) or not 1 <= p.topk <= MAX_TOPK:
        raise InvalidRequest(f"topk must be an integer in [1, {MAX_TOPK}] (1 is greedy), got {p.topk!r}")
    if p.seed is not None and (not _is_int(p.seed) or not 0 <= p.seed <= MAX_SEED):
        raise InvalidRequest(f"seed must be an integer in [0, 2**63 - 1] or null, got {p.seed!r}")


def sampling_fields() -> tuple[dataclasses.Field[Any], ...]:
    """The sampling options, in declaration order (what integrations expose and the protocol carries)."""
    return dataclasses.fields(SamplingParams)


def sampling_kwargs(source: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The sampling options present in ``source`` (a mapping, or any object with those attributes)."""
    names = [f.name for f in sampling_fields()]
    if isinstance(source, Mapping):
        return {n: source[n] for n in names if n in source}
    return {n: getattr(source, n) for n in names if hasattr(source, n)}

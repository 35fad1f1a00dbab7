"""Top-k / temperature sampling with per-row parameters and counter-based randomness.

The reference samples with an "exponential race" (argmax of probs / q, q ~ Exp(1)), which is an
exact multinomial draw without a host sync. We keep that, but derive q from a hash of
(seed, frame, codebook, token) instead of the global torch RNG. Why: the noise a request sees then
depends only on its own seed and progress, never on which other requests share the batch, the
device, or how many random numbers anyone drew before. So a seed reproduces the same audio, batched
or not, and the whole step stays free of RNG state (graph-capturable).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (bijective, good avalanche) computed in int64 without overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def exponential_noise(seed: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise of shape counter.shape + (vocab,), a pure function of seed, counter and token index.

    ``seed`` is (b,); ``counter`` is (b,) or (b, n) (n draws per row computed in one go).
    """
    token = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    key = _mix32(seed & _MASK32)
    key = _mix32((key + ((seed >> 32) & _MASK32)) & _MASK32)
    key = key.view(-1, *([1] * (counter.dim() - 1)))
    key = _mix32(key ^ (counter & _MASK32))
    h = _mix32(key.unsqueeze(-1) ^ ((token * 0x9E3779B9) & _MASK32))
    return -torch.log(open_unit_interval(h))


def open_unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 uniforms strictly inside (0, 1).

    23 bits, so the largest value, 1 - 2**-24, is still below 1.0 in float32. (With 24 bits it
    rounded up to 1.0 once in 2**24 draws: zero noise, and 0/0 = NaN won the race for a token the
    top-k filter had removed -- about once every 250 frames of a stream at top-k 50.)
    """
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


@dataclass
class SamplingState:
    """Per-row sampling tensors for one batched frame step; every field has shape (b,).

    The per-request fields mirror :class:`misotts_agents.engine.params.SamplingParams`; ``frame``
    is the index of the frame being generated. The step keeps one of these per static shape and the
    scheduler one row per slot, so a new option is a new field here and nothing else in between.
    """

    temperature: torch.Tensor  # float32, > 0
    topk: torch.Tensor  # int64, >= 1
    seed: torch.Tensor  # int64
    frame: torch.Tensor  # int64

    @classmethod
    def empty(cls, size: int, device: torch.device | str) -> SamplingState:
        """Neutral rows (temperature 1, greedy, seed 0, frame 0): what padding rows hold."""
        return cls(
            temperature=torch.ones(size, dtype=torch.float32, device=device),
            topk=torch.ones(size, dtype=torch.int64, device=device),
            seed=torch.zeros(size, dtype=torch.int64, device=device),
            frame=torch.zeros(size, dtype=torch.int64, device=device),
        )

    @classmethod
    def single(cls, temperature: float, topk: int, seed: int, frame: int, device: torch.device) -> SamplingState:
        state = cls.empty(1, device)
        state.set_row(0, temperature=temperature, topk=topk, seed=seed, frame=frame)
        return state

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def set_row(self, row: int, **values: float) -> None:
        """Write one row's values (keyword per field; fields not named keep their value)."""
        tensors = self._tensors()
        for name, value in values.items():
            # fill_ on the row: an indexed assignment of a Python number copies it from the host
            # synchronously on some torch versions (the host would wait for every queued step)
            tensors[name].narrow(0, row, 1).fill_(value)

    def select(self, rows: torch.Tensor) -> SamplingState:
        """The given rows, gathered (a copy)."""
        return SamplingState(**{name: t[rows] for name, t in self._tensors().items()})

    def put(self, rows: torch.Tensor, other: SamplingState) -> None:
        """Write ``other``'s rows into the given rows in place (the step's static buffers for graphs)."""
        for name, t in self._tensors().items():
            t.index_copy_(0, rows, getattr(other, name))

    def view(self, size: int) -> SamplingState:
        """The first ``size`` rows, as views (no copy)."""
        return SamplingState(**{name: t[:size] for name, t in self._tensors().items()})

    def advance(self, rows: torch.Tensor) -> None:
        """The given rows move on to their next frame."""
        self.frame[rows] += 1

    def frame_noise(self, num_codebooks: int, vocab: int) -> torch.Tensor:
        """The noise for every codebook of this frame at once, (b, num_codebooks, vocab).

        One batched hash instead of one per codebook: the step is dominated by small-op overhead.
        """
        codebooks = torch.arange(num_codebooks, device=self.seed.device, dtype=torch.int64)
        return exponential_noise(self.seed, self.frame[:, None] * 64 + codebooks, vocab)


def sample_topk(
    logits: torch.Tensor,
    state: SamplingState,
    codebook: int,
    noise: torch.Tensor | None = None,
    candidates: int | None = None,
) -> torch.Tensor:
    """Sample one token per row from (b, vocab) logits -> (b, 1) int64.

    Same filter as the reference's ``sample_topk`` (keep logits >= the k-th largest), computed in
    fp32 with per-row k and temperature. With k = 1 this is argmax, identical to the reference.
    ``noise`` is this codebook's slice of :meth:`SamplingState.frame_noise` when precomputed.

    Only the ``candidates`` largest logits of each row are ranked (``torch.topk``, not a sort of
    the whole vocabulary); every row's k must be at most ``candidates`` (None: the vocabulary,
    exact for any k). The draw is the exponential race over those candidates, with the noise of
    their own token ids, so it picks what the race over the whole vocabulary picks. (Logits tied
    with the k-th largest beyond the first ``candidates`` would be kept by the reference and are
    not here: float logits do not tie that way in practice.)
    """
    logits = logits.float() / state.temperature[:, None]
    vocab = logits.size(-1)
    n = vocab if candidates is None else min(candidates, vocab)
    top = torch.topk(logits, n, dim=-1)  # sorted, largest first
    kth = top.values.gather(-1, (state.topk.clamp(1, n) - 1)[:, None])
    kept = top.values.masked_fill(top.values < kth, float("-inf"))
    probs = torch.softmax(torch.log_softmax(kept, dim=-1), dim=-1)
    if noise is None:
        noise = exponential_noise(state.seed, state.frame * 64 + codebook, vocab)
    pick = torch.argmax(probs / noise.gather(-1, top.indices), dim=-1, keepdim=True)
    return top.indices.gather(-1, pick)

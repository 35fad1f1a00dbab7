"""Top-k / temperature sampling with per-row parameters and counter-based randomness.

The reference samples with an "exponential race" (argmax of probs / q, q ~ Exp(1)), which is an
exact multinomial draw without a host sync. We keep that, but derive q from a hash of
(seed, frame, codebook, token) instead of the global torch RNG. Why: the noise a request sees then
depends only on its own seed and progress, never on which other requests share the batch, the
device, or how many random numbers anyone drew before. So a seed reproduces the same audio, batched
or not, and the whole step stays free of RNG state (graph-capturable).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    uniform = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0
    return -torch.log(uniform)


@dataclass
class SamplingState:
    """Per-row sampling parameters for one batched frame step; all tensors have shape (b,)."""

    temperature: torch.Tensor  # float32
    topk: torch.Tensor  # int64, >= 1
    seed: torch.Tensor  # int64
    frame: torch.Tensor  # int64: index of the frame being generated, per row

    def frame_noise(self, num_codebooks: int, vocab: int) -> torch.Tensor:
        """The noise for every codebook of this frame at once, (b, num_codebooks, vocab).

        One batched hash instead of one per codebook: the step is dominated by small-op overhead.
        """
        codebooks = torch.arange(num_codebooks, device=self.seed.device, dtype=torch.int64)
        return exponential_noise(self.seed, self.frame[:, None] * 64 + codebooks, vocab)

    @classmethod
    def single(cls, temperature: float, topk: int, seed: int, frame: int, device: torch.device) -> SamplingState:
        return cls(
            temperature=torch.tensor([temperature], dtype=torch.float32, device=device),
            topk=torch.tensor([topk], dtype=torch.int64, device=device),
            seed=torch.tensor([seed], dtype=torch.int64, device=device),
            frame=torch.tensor([frame], dtype=torch.int64, device=device),
        )


def sample_topk(
    logits: torch.Tensor, state: SamplingState, codebook: int, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Sample one token per row from (b, vocab) logits -> (b, 1) int64.

    Same filter as the reference's ``sample_topk`` (keep logits >= the k-th largest), computed in
    fp32 with per-row k and temperature. With k = 1 this is argmax, identical to the reference.
    ``noise`` is this codebook's slice of :meth:`SamplingState.frame_noise` when precomputed.
    """
    logits = logits.float() / state.temperature[:, None]
    vocab = logits.size(-1)
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, (state.topk.clamp(1, vocab) - 1)[:, None])
    logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(torch.log_softmax(logits, dim=-1), dim=-1)
    if noise is None:
        noise = exponential_noise(state.seed, state.frame * 64 + codebook, vocab)
    return torch.argmax(probs / noise, dim=-1, keepdim=True)

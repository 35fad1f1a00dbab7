"""The per-frame step for a batch, at static shapes, captured as a CUDA graph on CUDA.

One step takes, for each active row, the next backbone input frame (the last prompt frame for a
request just prefilled, else ``[previous codes, 0]``) and produces that row's next 32 codes:
backbone decode, codebook-0 head and sampling, all 31 depth-decoder steps with sampling. Shapes
depend only on the batch-size *bucket*; rows beyond the active ones are padded with a scratch cache
row whose results are ignored.

By default there is one bucket, ``max_batch``: every step has the same shape, so a request's audio
is bit-identical whatever else shares the batch (matrix kernels round differently for different
row counts -- a one-row product is a matrix-vector kernel -- so a row's result would otherwise
depend on how many rows ran with it). On a memory-bound GPU the padding rows cost little.
``buckets=True`` uses 1, 2, 4, ... ``max_batch`` instead: less compute at low load, at the price
of last-bit differences between batch sizes. With ``max_batch=1`` the step is the reference's
batch-1 computation exactly. There is no branching on
tensor values and no host synchronisation inside: end-of-speech and cancellation are checked by
the scheduler between steps. Prefill (variable length) stays outside the captured graph.

On CUDA each bucket is captured once (``torch.cuda.CUDAGraph``) and replayed: one launch instead of
thousands of small kernels per frame. If capture fails, the step runs eagerly, with one warning.
On CPU it runs eagerly, or under ``torch.compile`` when asked (tested for identical codes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from misotts_agents.model.sampling import SamplingState
from misotts_agents.model.transformer import MisoModel

log = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch]


class _Bucket:
    """Static input/output buffers of one batch size (and its captured graph, if any)."""

    def __init__(self, size: int, k: int, device: torch.device) -> None:
        self.size = size
        self.rows = torch.zeros(size, dtype=torch.long, device=device)
        self.tokens = torch.zeros(size, 1, k + 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(size, 1, k + 1, dtype=torch.bool, device=device)
        self.pos = torch.zeros(size, 1, dtype=torch.long, device=device)
        self.sampling = SamplingState.empty(size, device)
        self.codes: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None


class FrameStepper:
    """Runs :meth:`MisoModel` frame steps for up to ``max_batch`` rows; ``scratch_row`` pads buckets."""

    def __init__(
        self,
        model: MisoModel,
        max_batch: int,
        scratch_row: int,
        cuda_graphs: bool | None = None,
        compile: bool = False,
        buckets: bool = False,
    ) -> None:
        self.model = model
        self.device = model.device
        self.scratch_row = scratch_row
        self.k = model.num_codebooks
        sizes = bucket_sizes(max_batch) if buckets else [max_batch]
        self.buckets = {b: _Bucket(b, self.k, self.device) for b in sizes}
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._fn: Callable[..., torch.Tensor] = self._step
        if compile:
            self._fn = torch.compile(self._step, dynamic=False, fullgraph=False)
        self._warned = False

    def _step(self, b: _Bucket) -> torch.Tensor:
        h = self.model.backbone_last_hidden(b.tokens, b.mask, b.pos, b.rows)
        return self.model.decode_frame(h, b.sampling)

    def bucket_for(self, n: int) -> _Bucket:
        for size, bucket in self.buckets.items():
            if size >= n:
                return bucket
        raise ValueError(f"{n} rows exceed the largest bucket ({max(self.buckets)})")

    def __call__(
        self,
        rows: torch.Tensor,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        sampling: SamplingState,
    ) -> torch.Tensor:
        """One step for n rows: rows (n,), tokens/mask (n, 1, K+1), pos (n, 1) -> codes (n, K)."""
        n = rows.size(0)
        b = self.bucket_for(n)
        b.rows[:n] = rows
        b.rows[n:] = self.scratch_row
        b.tokens[:n] = tokens
        b.tokens[n:] = 0
        b.mask[:n] = mask
        b.mask[n:] = False
        b.pos[:n] = pos
        b.pos[n:] = 0
        b.sampling.load(sampling)
        if self.cuda_graphs and b.graph is None and not self._warned:
            self._capture(b)
        if b.graph is not None:
            b.graph.replay()
            return b.codes[:n].clone()
        return self._fn(b)[:n]

    def _capture(self, b: _Bucket) -> None:
        """Capture this bucket's step; on failure warn once and stay eager for every bucket."""
        saved = b.rows.clone()
        try:
            b.rows.fill_(self.scratch_row)  # warm-up and capture write only into the scratch row
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._fn(b)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                b.codes = self._fn(b)
            b.graph = graph
            log.info("captured the frame step for batch bucket %d as a CUDA graph", b.size)
        except Exception as exc:  # capture is an optimisation: fall back, loudly, once
            self._warned = True
            self.cuda_graphs = False
            b.graph = None
            log.warning("CUDA graph capture failed (%s); running the frame step eagerly", exc)
        finally:
            b.rows.copy_(saved)

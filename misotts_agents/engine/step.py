"""The per-frame step for a batch, at a few static shapes, each captured as a CUDA graph at start-up.

One step takes, for each runnable row, the next backbone input frame (the last prompt frame for a
request just prefilled, else ``[previous codes, 0]``) and produces that row's next 32 codes:
backbone decode, codebook-0 head and sampling, all 31 depth-decoder steps with sampling. There is
no branching on tensor values and no host synchronisation inside: end-of-speech and cancellation
are checked by the scheduler between steps.

**Batch row = cache row.** A scheduler slot *is* a KV-cache row and a row of the step: the step
computes rows ``[0, batch)`` in place and attention reads those rows' caches directly (no copy of
any cache row, see transformer.CacheWindow). Rows in that range that do not run this step (free,
paced or still prefilling slots) are padding: their input position is parked at the last cache
position, which is scratch for every row (always written before it is read), and their codes are
dropped. The shape of a step (:class:`StepShape`) is chosen on the host from what the scheduler
already knows (slots, positions, top-k), never by reading the device:

- ``batch``: ``max_batch`` by default, so every step has the same matrix shapes and a request's
  audio does not depend on how many others share the step (a one-row product is a matrix-vector
  kernel and rounds differently from a 16-row one); with ``buckets=True`` the power of two above
  the highest runnable slot (less compute at low load, last-bit differences between sizes);
- ``attend``: the power of two above the highest runnable slot: padding rows beyond it skip
  attention, so at low load they cost only their (memory-bound, nearly free on a GPU) matmul rows;
- ``length``: the window of cache positions attention reads (transformer.length_buckets), so a
  step reads the positions in use, not all 2048. A row's result can differ in the last bit between
  windows (the attention kernel's blocking), never with other rows' contents;
- ``candidates``: top-k ranks the 64 largest logits (default top-k is 50), or the whole vocabulary
  when a row asks for more.

**Graphs before the first request.** On CUDA the step's layers are compiled (``torch.compile``,
one graph per call pattern shared by every layer of a stack, symbolic sizes) and every shape is
captured at construction, one log line per shape with its time. Capture runs on its own stream
in thread-local capture mode, so other threads' GPU work cannot break it. A shape that fails to
capture runs eagerly (logged as an error); the others stay captured. On CPU the step runs
eagerly, or compiled when asked (tested for identical codes).

**Copies.** Host positions go to the device through a pinned buffer (non-blocking); the codes
leave the static output with one device-side gather. Nothing here waits for the device.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from misotts_agents.model.sampling import SamplingState
from misotts_agents.model.transformer import CacheWindow, MisoModel, length_bucket, length_buckets

log = logging.getLogger(__name__)

# Top-k candidates ranked when every row's k fits (the default top-k is 50).
TOPK_CANDIDATES = 64


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... below ``max_batch``, then ``max_batch``."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return [*sizes, max_batch]


def _smallest_at_least(sizes: list[int], n: int) -> int:
    i = bisect.bisect_left(sizes, n)
    if i == len(sizes):
        raise ValueError(f"{n} exceeds the largest size {sizes[-1]}")
    return sizes[i]


@dataclass(frozen=True, order=True)
class StepShape:
    """One static shape of the step (see the module docstring)."""

    batch: int  # rows computed: cache rows [0, batch)
    attend: int  # rows [0, attend) attend; the rest are padding
    length: int  # cache positions attention reads
    candidates: int  # logits ranked per row for top-k

    def __str__(self) -> str:
        return f"batch {self.batch}, attend {self.attend}, length {self.length}, top-k candidates {self.candidates}"


class HostRows(NamedTuple):
    """The host's copy of what a step runs: slots, their positions, the largest top-k among them."""

    slots: Sequence[int]
    positions: Sequence[int]
    topk: int


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    codes: torch.Tensor  # the graph's static output, (batch, K)


class FrameStepper:
    """Runs :class:`MisoModel` frame steps for up to ``max_batch`` rows (slots 0..max_batch-1).

    ``cuda_graphs`` and ``compile`` default to on for CUDA and off elsewhere. The model must have
    KV caches for ``max_batch`` rows.
    """

    def __init__(
        self,
        model: MisoModel,
        max_batch: int,
        cuda_graphs: bool | None = None,
        compile: bool | None = None,
        buckets: bool = False,
    ) -> None:
        if model.max_batch < max_batch:
            raise ValueError(f"the model has KV caches for {model.max_batch} rows, the step needs {max_batch}")
        self.model = model
        self.device = model.device
        self.max_batch = max_batch
        self.buckets = buckets
        self.k = k = model.num_codebooks
        self.max_len = model.backbone.max_len
        self.scratch_position = self.max_len - 1
        self.batch_sizes = bucket_sizes(max_batch) if buckets else [max_batch]
        self.attend_sizes = bucket_sizes(max_batch)
        self.lengths = length_buckets(self.max_len)
        vocab = model.audio_vocab_size
        self.candidate_sizes = sorted({min(TOPK_CANDIDATES, vocab), vocab})
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        self.compiled = on_cuda if compile is None else compile
        # Static inputs for rows [0, max_batch); a shape reads the first `batch` rows.
        dev = self.device
        self.tokens = torch.zeros(max_batch, 1, k + 1, dtype=torch.long, device=dev)
        self.mask = torch.zeros(max_batch, 1, k + 1, dtype=torch.bool, device=dev)
        self.pos = torch.full((max_batch, 1), self.scratch_position, dtype=torch.long, device=dev)
        self.sampling = SamplingState.empty(max_batch, dev)
        self._sampling_views = {b: self.sampling.view(b) for b in self.batch_sizes}
        self._pos_host = torch.empty(max_batch, dtype=torch.long, pin_memory=on_cuda)
        self._staged = torch.cuda.Event() if on_cuda else None  # the last host-to-device copy of positions
        self.graphs: dict[StepShape, _Captured] = {}
        self.eager_shapes: set[StepShape] = set()  # shapes whose capture failed
        self._capture_stream: torch.cuda.Stream | None = None
        if self.compiled:
            model.compile_layers()
        if self.cuda_graphs:
            self._pool = torch.cuda.graph_pool_handle()
            self.warm_up()

    # -- shapes ---------------------------------------------------------------------------------

    def shapes(self) -> list[StepShape]:
        """Every shape :meth:`shape_for` can return."""
        return [
            StepShape(batch, attend, length, candidates)
            for batch in self.batch_sizes
            for attend in ([batch] if self.buckets else bucket_sizes(batch))
            for length in self.lengths
            for candidates in self.candidate_sizes
        ]

    def shape_for(self, slots: Sequence[int], positions: Sequence[int], topk: int) -> StepShape:
        """The shape of a step running ``slots`` at ``positions`` with a largest top-k of ``topk``."""
        if not slots or len(slots) != len(positions):
            raise ValueError(f"need one position per slot, got {len(slots)} slots and {len(positions)} positions")
        low, top = min(slots), max(slots) + 1
        if low < 0 or top > self.max_batch:
            raise ValueError(f"slots must be in 0..{self.max_batch - 1}, got {sorted(slots)}")
        first, last = min(positions), max(positions)
        if first < 0 or last >= self.max_len:
            raise ValueError(f"positions must be in 0..{self.max_len - 1}, got {first}..{last}")
        batch = _smallest_at_least(self.batch_sizes, top)
        attend = batch if self.buckets else _smallest_at_least(self.attend_sizes, top)
        length = length_bucket(last + 1, self.max_len)
        candidates = _smallest_at_least(self.candidate_sizes, max(topk, 1))
        return StepShape(batch, attend, length, candidates)

    # -- running ---------------------------------------------------------------------------------

    def __call__(
        self,
        rows: torch.Tensor,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        sampling: SamplingState,
        host: HostRows | None = None,
    ) -> torch.Tensor:
        """One step for n rows: rows (n,), tokens/mask (n, 1, K+1), pos (n, 1) -> codes (n, K).

        ``host`` is the host's copy of ``rows``, ``pos`` and the largest ``sampling.topk``; give it
        (the scheduler does), or they are read from the device, which waits for it.
        """
        if host is None:
            host = HostRows(rows.tolist(), pos.reshape(-1).tolist(), int(sampling.topk.max()))
        slots, positions = list(host.slots), list(host.positions)
        shape = self.shape_for(slots, positions, host.topk)
        self._stage(shape, rows, tokens, mask, sampling, slots, positions)
        captured = self.graphs.get(shape)
        if captured is not None:
            captured.graph.replay()
            codes = captured.codes
        else:
            codes = self._run(shape)
        return codes.index_select(0, rows)

    def _stage(
        self,
        shape: StepShape,
        rows: torch.Tensor,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        sampling: SamplingState,
        slots: list[int],
        positions: list[int],
    ) -> None:
        """Write this step's inputs into the static buffers: device rows in place, positions from the host."""
        self.tokens.index_copy_(0, rows, tokens)
        self.mask.index_copy_(0, rows, mask)
        self.sampling.put(rows, sampling)
        if self._staged is not None:
            self._staged.synchronize()  # the previous step's copy has left the pinned buffer (long since)
        host = self._pos_host.numpy()
        host[: shape.batch] = self.scratch_position  # padding rows: scratch position, results dropped
        host[slots] = positions
        self.pos[: shape.batch, 0].copy_(self._pos_host[: shape.batch], non_blocking=True)
        if self._staged is not None:
            self._staged.record()

    def _run(self, shape: StepShape) -> torch.Tensor:
        """The step itself, eagerly (or through the compiled layers): codes for rows [0, batch)."""
        b = shape.batch
        window = CacheWindow(shape.length, None if shape.attend == b else shape.attend)
        h = self.model.backbone_last_hidden(self.tokens[:b], self.mask[:b], self.pos[:b], window)
        return self.model.decode_frame(h, self._sampling_views[b], candidates=shape.candidates)

    # -- start-up ---------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Compile and capture every shape now, before any request: a first stream never waits for it."""
        shapes = self.shapes()
        began = time.perf_counter()
        log.info("frame step: capturing %d shapes (CUDA graphs, compiled=%s)", len(shapes), self.compiled)
        self.pos.fill_(self.scratch_position)  # warm-up and capture write only at the scratch position
        with torch.inference_mode():
            for shape in shapes:
                started = time.perf_counter()
                try:
                    self.graphs[shape] = self._capture(shape)
                except Exception as exc:  # one shape's failure must not cost the others their graphs
                    self.eager_shapes.add(shape)
                    log.error(
                        "frame step: CUDA graph capture FAILED for %s (%s: %s); this shape runs eagerly, "
                        "much slower, the others stay captured",
                        shape,
                        type(exc).__name__,
                        exc,
                    )
                    continue
                log.info("frame step: captured %s in %.2f s", shape, time.perf_counter() - started)
        log.info(
            "frame step: %d of %d shapes captured in %.1f s%s",
            len(self.graphs),
            len(shapes),
            time.perf_counter() - began,
            f"; {len(self.eager_shapes)} run eagerly" if self.eager_shapes else "",
        )

    def _capture(self, shape: StepShape) -> _Captured:
        if self._capture_stream is None:  # one for every shape (the pool has 32 streams)
            self._capture_stream = torch.cuda.Stream(self.device)
        stream = self._capture_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._run(shape)  # compiles, allocates and tunes outside the capture
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
            codes = self._run(shape)
        return _Captured(graph, codes)

"""Batched streaming Mimi decode: one decoder per engine, one 80 ms frame per row per call.

Split from :mod:`misotts_agents.model.codec` (loading and whole-clip calls): this is the engine's
per-step decoder, with its rows' streaming state and, on CUDA, one captured graph per batch shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

import torch

from misotts_agents.audio import FRAME_SAMPLES
from misotts_agents.model.codec import check_codes
from misotts_agents.model.mimi import DecodeState, MimiModel

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    """One captured decode shape: its static inputs, the graph, and the output it writes."""

    graph: torch.cuda.CUDAGraph
    codes: torch.Tensor
    active: torch.Tensor
    pcm: torch.Tensor


class MimiStreamDecoder:
    """Streaming Mimi decode for a fixed number of rows, one 80 ms frame per row per call.

    Each row is an independent stream (one utterance at a time) sharing a single batched decode call,
    so a continuous-batching engine pays one Mimi call per step instead of one per stream. The rows'
    state (conv tails, transposed-conv overlaps, ring KV caches, positions) is this object's own
    :class:`DecodeState`: ``reset`` puts chosen rows back to a fresh stream (a new utterance), and rows
    left out of ``active`` keep their state exactly as it was, as if that step never happened.

    A call decodes rows ``[0, n)`` for codes of ``n`` rows (``n`` up to ``batch_size``): the engine
    computes the rows up to its highest busy slot, the others keep their state. On CUDA each size in
    ``graph_sizes`` (default: ``batch_size`` alone; the frame step's batch sizes when it buckets) is a
    CUDA graph captured by :meth:`warm_up` before any request; other sizes run eagerly. Not
    thread-safe: drive it from one thread (the engine's step loop). Several decoders may share a model.
    """

    def __init__(
        self,
        mimi: MimiModel,
        batch_size: int = 1,
        *,
        graph_sizes: Sequence[int] | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        sizes = sorted({int(n) for n in graph_sizes}) if graph_sizes is not None else [batch_size]
        if not sizes or sizes[0] < 1 or sizes[-1] > batch_size:
            raise ValueError(f"graph_sizes must be in 1..{batch_size}, got {graph_sizes}")
        self.mimi = mimi
        self.batch_size = batch_size
        self.device = next(mimi.parameters()).device
        self.graph_sizes = sizes
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs a model on a CUDA device")
        self._state: DecodeState | None = mimi.decode_state(batch_size)
        self._views: dict[int, DecodeState] = {}
        self._graphs: dict[int, _Graph] = {}
        self._capture_stream: torch.cuda.Stream | None = None

    @property
    def num_codebooks(self) -> int:
        """Codebooks expected per frame (the model's active count)."""
        return int(self.mimi.num_codebooks)

    @property
    def closed(self) -> bool:
        return self._state is None

    @property
    def captured_sizes(self) -> list[int]:
        """The row counts that replay a CUDA graph (empty on CPU, or before :meth:`warm_up`)."""
        return sorted(self._graphs)

    def rows_for(self, top_row: int) -> int:
        """How many rows a call should decode to include row ``top_row``: the smallest graph size
        above it (every row when sizes are not bucketed)."""
        if not 0 <= top_row < self.batch_size:
            raise IndexError(f"row {top_row} out of range for batch_size {self.batch_size}")
        return next(n for n in self.graph_sizes if n > top_row) if self.graph_sizes[-1] > top_row else self.batch_size

    def _require_state(self) -> DecodeState:
        if self._state is None:
            raise RuntimeError("MimiStreamDecoder is closed")
        return self._state

    def _rows_state(self, n: int) -> DecodeState:
        """The state of rows ``[0, n)`` (a view: updating it updates the decoder's rows)."""
        state = self._require_state()
        if n == self.batch_size:
            return state
        view = self._views.get(n)
        if view is None:
            view = self._views[n] = state.rows(n)
        return view

    def _row_mask(self, rows: Sequence[int] | None) -> torch.Tensor:
        mask = torch.zeros(self.batch_size, dtype=torch.bool)
        if rows is None:
            mask.fill_(True)
        for row in rows or ():
            if not 0 <= int(row) < self.batch_size:
                raise IndexError(f"row {row} out of range for batch_size {self.batch_size}")
            mask[int(row)] = True
        if self.device.type == "cuda":  # from pinned memory: the copy is queued, the host does not wait
            mask = mask.pin_memory()
        return mask.to(self.device, non_blocking=True)

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Start a new utterance in ``rows`` (all rows if None): their state becomes that of a fresh
        decoder, the other rows are untouched."""
        state = self._require_state()
        mask = self._row_mask(rows)
        with torch.inference_mode():
            state.reset(mask)

    def _active_mask(self, active: torch.Tensor | Sequence[bool] | None, n: int) -> torch.Tensor:
        if active is None:
            return torch.ones(n, dtype=torch.bool, device=self.device)
        mask = torch.as_tensor(active, device=self.device)
        if mask.dtype != torch.bool or mask.shape != (n,):
            raise ValueError(f"active must be a bool mask of shape ({n},), got {mask.dtype} {tuple(mask.shape)}")
        return mask

    def decode(
        self, codes: torch.Tensor, active: torch.Tensor | Sequence[bool] | None = None, validate: bool = True
    ) -> torch.Tensor:
        """Decode one frame for each of the rows ``[0, n)``.

        ``codes``: integer (n, K), n <= batch_size, K == num_codebooks, values in 0..2047 for active
        rows (inactive rows may hold anything, e.g. padding; they are replaced by 0 before decoding).
        ``active``: optional bool mask (n,); rows that are False keep their streaming state unchanged
        and get zeros in the output. Returns float32 PCM (n, 1920) on the model's device.
        Raises ValueError on out-of-range codes: the engine must drop EOS/padding ids first; this is
        the last line of defence before an out-of-bounds embedding lookup (a hard crash on CUDA).
        ``validate=False`` skips that check and the all-rows-inactive shortcut, both of which read
        the device: for a caller that has just mapped its codes into range (the frame step, whose
        host must not wait for the step before it queues Mimi).
        """
        self._require_state()
        n = codes.shape[0] if codes.dim() == 2 else -1
        if codes.dim() != 2 or not 1 <= n <= self.batch_size or codes.shape[1] != self.num_codebooks:
            raise ValueError(
                f"codes must have shape (n, {self.num_codebooks}) with n in 1..{self.batch_size} "
                f"(one frame per row), got {tuple(codes.shape)}"
            )
        mask = self._active_mask(active, n)
        codes = codes.to(self.device)
        if active is not None:
            codes = torch.where(mask[:, None], codes, torch.zeros_like(codes))
        if validate:
            check_codes(codes)
            if active is not None and not bool(mask.any()):
                # Nothing to run: skipping leaves every row's state untouched, same as an all-False mask.
                return torch.zeros(n, FRAME_SAMPLES, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            captured = self._graphs.get(n)
            if captured is not None:
                captured.codes.copy_(codes)
                captured.active.copy_(mask)
                captured.graph.replay()
                pcm = captured.pcm
            else:
                pcm = self.mimi.decode_step(codes.to(torch.int64), self._rows_state(n), mask)
        # A fresh tensor either way: a captured graph's output is overwritten by its next replay.
        return torch.where(mask[:, None], pcm.float(), torch.zeros((), device=self.device))

    def warm_up(self, calls: int = 2) -> None:
        """Before any request: run each graph size ``calls`` times with every row inactive (no row's
        state changes), then, on CUDA, capture each size as a CUDA graph. A size whose capture fails
        runs eagerly (logged as an error); the others stay captured."""
        self._require_state()
        for n in self.graph_sizes:
            idle = torch.zeros(n, self.num_codebooks, dtype=torch.long, device=self.device)
            inactive = torch.zeros(n, dtype=torch.bool, device=self.device)
            with torch.inference_mode():
                for _ in range(calls):
                    self.mimi.decode_step(idle, self._rows_state(n), inactive)
            if not self.cuda_graphs or n in self._graphs:
                continue
            try:
                self._graphs[n] = self._capture(n)
            except Exception as exc:
                log.error(
                    "Mimi decode: CUDA graph capture FAILED for %d rows (%s: %s); that size runs eagerly",
                    n,
                    type(exc).__name__,
                    exc,
                )

    def _capture(self, n: int) -> _Graph:
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self.device)
        stream = self._capture_stream
        codes = torch.zeros(n, self.num_codebooks, dtype=torch.long, device=self.device)
        active = torch.zeros(n, dtype=torch.bool, device=self.device)
        state = self._rows_state(n)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            pcm = self.mimi.decode_step(codes, state, active)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return _Graph(graph, codes, active, pcm)

    def close(self) -> None:
        """Drop the streaming state and graphs (their memory). Idempotent."""
        self._state = None
        self._views.clear()
        self._graphs.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

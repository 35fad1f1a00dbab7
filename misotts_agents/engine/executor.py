"""The device side of the engine: runs what the scheduler decided, without waiting for the device.

The scheduler (scheduler.py) decides which rows step and which prompt chunks are prefilled; this
module owns what makes that fast on a GPU and is policy-free:

- **per-row step inputs** on the device (each slot's next input frame, its position as a host int,
  its sampling settings), advanced right after a step is queued, from codes not yet read, so the
  next step can be queued before this one's results reach the host;
- **Mimi on a stream of its own** (CUDA): a step's decode (and row resets) run beside the next
  frame step, which needs the step's codes, not its audio;
- **copies out** into pinned memory on Mimi's stream, marked done by an event (:class:`InFlight`):
  the host waits once per step, for the oldest step's copies.

On CPU the device is the host: queuing a step runs it, and its results are the host's at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import torch

from misotts_agents.engine.device import to_device
from misotts_agents.engine.prefill import pass_inputs
from misotts_agents.engine.prompt import Prompt
from misotts_agents.engine.step import FrameStepper, HostRows
from misotts_agents.model import codec
from misotts_agents.model.mimi_stream import MimiStreamDecoder
from misotts_agents.model.sampling import SamplingState
from misotts_agents.model.transformer import MisoModel, length_bucket

J = TypeVar("J")


class Frame(NamedTuple):
    """A frame step's codes, on the device, before Mimi and the copies are queued."""

    slots: list[int]
    rows: torch.Tensor  # the slots, on the device
    positions: list[int]  # each row's position in the step
    codes: torch.Tensor  # (n, K)


@dataclass(eq=False)
class InFlight(Generic[J]):
    """A queued frame step whose codes and audio the host has not read yet."""

    jobs: list[J]  # its rows' requests, in row order; a row whose job has since ended is dropped
    positions: list[int]  # each row's position in this step
    codes: torch.Tensor  # (n, K), on the host once ``done`` has passed
    pcm: torch.Tensor  # (rows decoded, 1920), likewise
    done: torch.cuda.Event | None  # None when the copies had finished on return (CPU)

    def wait(self) -> tuple[np.ndarray, np.ndarray]:
        """The step's codes and audio, once the device has produced and copied them."""
        if self.done is not None:
            self.done.synchronize()
        return self.codes.numpy(), self.pcm.numpy()


class Executor:
    """Frame steps, prefill passes and Mimi decodes for ``max_batch`` slots (slot i = cache row i)."""

    def __init__(
        self,
        model: MisoModel,
        decoder: MimiStreamDecoder,
        max_batch: int,
        cuda_graphs: bool | None = None,
        compile: bool | None = None,
        buckets: bool = False,
    ) -> None:
        self.model = model
        self.decoder = decoder
        self.device = dev = model.device
        self.k = k = model.num_codebooks
        # (high priority: its own pool of streams, so never one of those other threads draw from)
        self.mimi_stream = torch.cuda.Stream(dev, priority=-1) if dev.type == "cuda" else None
        if self.mimi_stream is not None:
            self.mimi_stream.wait_stream(torch.cuda.current_stream(dev))  # the decoder's fresh state
            with torch.cuda.stream(self.mimi_stream), torch.inference_mode():
                decoder.warm_up()  # its CUDA graphs, captured now rather than in a request's step
            self.mimi_stream.synchronize()
        self.stepper = FrameStepper(model, max_batch, cuda_graphs=cuda_graphs, compile=compile, buckets=buckets)
        # Per slot: the next backbone input frame, its position (host ints: no sync), sampling settings.
        self.next_tokens = torch.zeros(max_batch, 1, k + 1, dtype=torch.long, device=dev)
        self.next_mask = torch.zeros(max_batch, 1, k + 1, dtype=torch.bool, device=dev)
        self.audio_mask = torch.ones(1, k + 1, dtype=torch.bool, device=dev)
        self.audio_mask[0, k] = False
        self.positions = [0] * max_batch
        self.sampling = SamplingState.empty(max_batch, dev)

    # -- prefill ------------------------------------------------------------------------------

    def prefill(self, chunks: Sequence[tuple[int, Prompt, int, int]], width: int) -> None:
        """One batched forward of prompt chunks ``(slot, prompt, start, length)``, padded to ``width``:
        their KV entries go into the slots' cache rows."""
        tokens, mask, pos = pass_inputs(
            [(prompt.tokens, prompt.mask, start, n) for _, prompt, start, n in chunks], width, self.device
        )
        rows = to_device([slot for slot, *_ in chunks], self.device)
        # the window, from the host's positions (reading the device's would wait for it)
        length = length_bucket(max(start for _, _, start, _ in chunks) + width, self.model.backbone.max_len)
        self.model.backbone_last_hidden(tokens, mask, pos, rows, length)

    def start_row(self, slot: int, prompt: Prompt, sampling: dict[str, float]) -> None:
        """The slot's prompt is in: its first step input is the prompt's last frame; fresh sampling
        settings and Mimi state (behind the slot's last occupant's decodes, before its own)."""
        end = prompt.length - 1
        self.next_tokens[slot] = to_device(prompt.tokens[end:], self.device)
        self.next_mask[slot] = to_device(prompt.mask[end:], self.device)
        self.positions[slot] = end
        self.sampling.set_row(slot, **sampling)
        with self._on_mimi_stream():
            self.decoder.reset([slot])

    # -- frame steps --------------------------------------------------------------------------

    def frame(self, slots: list[int], topk: int) -> Frame:
        """The model's frame step for ``slots``: codes (n, K) on the device, queued.

        It changes no state (positions, inputs and sampling counters advance in :meth:`queue`), so
        it can be run again with fewer rows: the KV entries it wrote are rewritten at the same
        positions, and the keyed sampling draws the same codes again.
        """
        rows = to_device(slots, self.device)
        positions = [self.positions[s] for s in slots]
        pos = to_device(positions, self.device).unsqueeze(1)
        sampling = self.sampling.select(rows)
        # the host's copy of rows, positions and top-k: the step picks its shape without reading the device
        codes = self.stepper(
            rows, self.next_tokens[rows], self.next_mask[rows], pos, sampling, HostRows(slots, positions, topk)
        )
        return Frame(slots, rows, positions, codes)

    def queue(self, frame: Frame, jobs: list[J]) -> InFlight[J]:
        """Queue the step's Mimi decode and the copies of its results, then move its rows on to
        their next step's inputs (on the device, from the codes not yet read)."""
        slots, rows, codes = frame.slots, frame.rows, frame.codes
        pcm = self._decode(rows, codes, max(slots))
        step = self._copy_out(jobs, frame.positions, codes, pcm)
        self.next_tokens[rows, 0, : self.k] = codes
        self.next_mask[rows] = self.audio_mask
        self.sampling.advance(rows)
        for s in slots:
            self.positions[s] += 1
        return step

    def _decode(self, rows: torch.Tensor, codes: torch.Tensor, top_row: int) -> torch.Tensor:
        """One Mimi decode for the rows up to the highest speaking one (all ``max_batch`` rows unless
        the step buckets its batch, then the step's bucket), audio (n, 1920) on the device; on CUDA
        on Mimi's stream, beside the next frame step. Rows whose codes end the speech are left inactive."""
        dev = self.device
        n = self.decoder.rows_for(top_row)
        batch = torch.zeros(n, self.k, dtype=torch.long, device=dev)
        batch[rows] = codes * (codes < codec.CODEBOOK_SIZE)  # ids 2048..2050 are not Mimi codes
        active = torch.zeros(n, dtype=torch.bool, device=dev)
        active[rows] = codes.any(dim=1)
        # in range by construction: Mimi is queued right behind the step, without reading the device
        if self.mimi_stream is None:
            return self.decoder.decode(batch, active, validate=False)
        self.mimi_stream.wait_stream(torch.cuda.current_stream(dev))  # the codes are in
        batch.record_stream(self.mimi_stream)
        active.record_stream(self.mimi_stream)
        with torch.cuda.stream(self.mimi_stream):
            return self.decoder.decode(batch, active, validate=False)

    def _copy_out(self, jobs: list[J], positions: list[int], codes: torch.Tensor, pcm: torch.Tensor) -> InFlight[J]:
        """Queue the copies of a step's results to the host, on CUDA on Mimi's stream (behind the
        decode; the codes were final before it), into pinned memory (a copy into pageable memory
        would wait), marked done by an event; on CPU they are the host's already."""
        stream = self.mimi_stream
        if stream is None:
            return InFlight(jobs, positions, codes, pcm, None)
        codes.record_stream(stream)  # made on the step's stream, read on this one
        with torch.cuda.stream(stream):
            host_codes = torch.empty(codes.shape, dtype=codes.dtype, pin_memory=True).copy_(codes, non_blocking=True)
            host_pcm = torch.empty(pcm.shape, dtype=pcm.dtype, pin_memory=True).copy_(pcm, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return InFlight(jobs, positions, host_codes, host_pcm, done)

    def _on_mimi_stream(self) -> contextlib.AbstractContextManager[object]:
        return torch.cuda.stream(self.mimi_stream) if self.mimi_stream is not None else contextlib.nullcontext()

    def synchronize(self) -> None:
        """Wait for Mimi's stream (at shutdown: the decoder's state is released after this)."""
        if self.mimi_stream is not None:
            self.mimi_stream.synchronize()

    # -- the voice prefix's KV ------------------------------------------------------------------

    def import_prefix(self, slot: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.model.backbone.import_prefix(slot, kv)

    def export_prefix(self, slot: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.model.backbone.export_prefix(slot, length)

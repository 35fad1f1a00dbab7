"""StepMarker: the watermark, applied once per engine step to every chunk that leaves in it.

A watermarked stream's outgoing items (audio chunks, its end or failure) come here instead of its
mailbox. The scheduler delivers a step's chunks in one burst while it reads the step, then calls
:meth:`StepMarker.end_step`: the chunks of that step become one batch, and the marker's own thread
marks the batch with one :meth:`Watermarker.mark_streams` call (on CUDA on a stream of its own, so
it never waits behind frame steps, nor they behind it) and puts each marked chunk in its stream's
mailbox. No lock is held while marking, and no chunk waits for anything but the batches before it.

**Order.** Each stream's items reach its mailbox in the order they were submitted: an end or a
failure submitted while the stream still has chunks here waits behind them; one submitted when it
has none (a preparation thread's rejection, a cancellation) is delivered at once.

**Failures and cancellation.** A chunk whose marking fails ends its request alone: the stream gets
the exception after its earlier chunks (``SpeechStream.abort``), which also cancels it so the
scheduler frees its slot; its later chunks are dropped. A cancelled stream's pending chunks are
dropped, not marked, and none is delivered after the cancel.

**Bounds.** A step adds at most one chunk per row, so a batch holds at most ``max_batch`` chunks.
A step's batch is handed over at once; while more than ``max_backlog`` batches are then here (the
one being marked included), the scheduler waits at the end of its step. So at most
``max_backlog + 1`` steps' chunks are held, and a marker slower than generation slows generation
down to its pace instead of growing memory (or the lag of everyone's audio) without limit.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from misotts_agents.engine.request import AudioChunk
from misotts_agents.model.watermark import Watermarker
from misotts_agents.model.watermark_stream import StreamWatermarker

if TYPE_CHECKING:
    from misotts_agents.engine.stream import SpeechStream

log = logging.getLogger(__name__)

#: Batches (engine steps that delivered chunks) that may wait for or be in marking without the
#: scheduler waiting: enough to ride out a slow marking pass, few enough to bound memory and lag.
MAX_BACKLOG = 4

_Batch = list[tuple["SpeechStream", AudioChunk]]


@dataclass
class _Pending:
    """A stream's chunks still here, and what it was sent after them (its end or failure)."""

    chunks: int = 0
    after: list[object] = field(default_factory=list)


class StepMarker:
    """Marks every engine step's chunks in one batched call, on a thread of its own (module docstring)."""

    def __init__(self, watermarker: Watermarker, device: torch.device, max_backlog: int = MAX_BACKLOG) -> None:
        if max_backlog < 1:
            raise ValueError("max_backlog must be >= 1")
        self.watermarker = watermarker
        self.device = device
        self.max_backlog = max_backlog
        self._cond = threading.Condition()  # guards everything below; never held while marking
        self._step: _Batch = []  # the chunks of the step being read
        self._batches: deque[_Batch] = deque()  # steps handed over; the first is being marked
        self._pending: dict[SpeechStream, _Pending] = {}
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="misotts-marker", daemon=True)
        self.thread.start()

    # -- called by the streams and the scheduler ------------------------------------------------

    def submit(self, stream: SpeechStream, item: object) -> None:
        """Take a watermarked stream's next outgoing item (any thread; chunks come from the scheduler)."""
        with self._cond:
            pending = self._pending.get(stream)
            if not isinstance(item, AudioChunk):
                if pending is None:
                    stream.mailbox.put(item)  # nothing of its own ahead of it
                else:
                    pending.after.append(item)
                return
            if pending is None:
                pending = self._pending[stream] = _Pending()
            elif any(s is stream for s, _ in self._step):
                self._hand_over()  # a stream at most once per marking call
            pending.chunks += 1
            self._step.append((stream, item))

    def end_step(self) -> None:
        """The scheduler has read a step: its chunks go to be marked together. Waits while
        ``max_backlog`` batches are already waiting (back-pressure on the scheduler)."""
        with self._cond:
            if self._step:
                self._hand_over()
            while len(self._batches) > self.max_backlog:
                self._cond.wait()

    def close(self) -> None:
        """Mark and deliver what was handed over, then stop the thread (after the scheduler stopped)."""
        with self._cond:
            if self._step:
                self._hand_over()
            self._stopping = True
            self._cond.notify_all()
        self.thread.join()

    def _hand_over(self) -> None:
        self._batches.append(self._step)
        self._step = []
        self._cond.notify_all()

    # -- the marker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        side = None
        if self.device.type == "cuda":
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.default_stream(self.device))  # the watermarker's weights are in
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext(), torch.inference_mode():
            while True:
                with self._cond:
                    while not self._batches and not self._stopping:
                        self._cond.wait()
                    if not self._batches:
                        return
                    batch = self._batches[0]
                self._mark(batch)
                with self._cond:
                    self._batches.popleft()
                    self._cond.notify_all()  # a scheduler waiting on the backlog

    def _mark(self, batch: _Batch) -> None:
        """One marking call for the batch's live chunks, then each result to its stream, in order."""
        live = [i for i, (stream, _) in enumerate(batch) if not stream.cancelled.is_set()]
        results: list[np.ndarray | Exception | None] = [None] * len(batch)  # None: cancelled, dropped
        if live:
            try:
                marked = self.watermarker.mark_streams([(_state(batch[i][0]), batch[i][1].pcm) for i in live])
                for i, result in zip(live, marked, strict=True):
                    results[i] = result
            except Exception as exc:  # the call as a whole: each of its requests ends with it
                log.exception("watermarking a step's %d chunks failed", len(live))
                for i in live:
                    results[i] = exc
        for (stream, chunk), result in zip(batch, results, strict=True):
            self._delivered(stream, chunk, result)

    def _delivered(self, stream: SpeechStream, chunk: AudioChunk, result: np.ndarray | Exception | None) -> None:
        """The stream's oldest chunk here is done: its marked audio or its failure (unless the
        stream was cancelled since), then, once it has no chunk left here, what was sent after them."""
        with self._cond:
            if stream.cancelled.is_set() or result is None:
                pass  # dropped: nobody reads a cancelled stream
            elif isinstance(result, Exception):
                log.error("watermarking a chunk failed; ending its request alone: %r", result)
                stream.abort(result)  # cancels it, so the scheduler frees its slot
                stream.mailbox.put(result)
            else:
                stream.mailbox.put(replace(chunk, pcm=result))
            pending = self._pending[stream]
            pending.chunks -= 1
            if pending.chunks == 0:
                del self._pending[stream]
                for item in pending.after:
                    stream.mailbox.put(item)


def _state(stream: SpeechStream) -> StreamWatermarker:
    """The stream's watermark state: every stream whose items come here has one."""
    if stream.watermark is None:
        raise RuntimeError("the stream is not watermarked")
    return stream.watermark

"""SpeechStream: the caller's end of one request.

The scheduler thread pushes audio chunks into the stream's mailbox; the caller pulls them by
iterating (blocking) or ``async for`` (awaiting without blocking the event loop). A watermarked
stream's chunks, its end and its failure go through the engine's marker instead (marking.py): it
marks each engine step's chunks together on a thread of its own, off the scheduler's and the
callers' threads, and puts them in the mailbox in order. Word timings (engine/words.py) are
attached here, as each chunk reaches the caller; so is the time to first audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from misotts_agents.audio import FRAME_MS
from misotts_agents.engine.audio_stream import StreamEnd
from misotts_agents.engine.request import AudioChunk, StopReason, StreamStats, SynthesisRequest
from misotts_agents.engine.words import WordAligner
from misotts_agents.model.config import MAX_SEQ_LEN
from misotts_agents.model.watermark_stream import StreamWatermarker

if TYPE_CHECKING:
    from misotts_agents.engine.marking import StepMarker


class Mailbox:
    """A thread-safe FIFO with blocking ``get`` and awaitable ``aget``, for one consumer."""

    def __init__(self) -> None:
        self._items: deque[object] = deque()
        self._cond = threading.Condition()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    def put(self, item: object) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, future = waiter
            with contextlib.suppress(RuntimeError):  # the consumer's loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_wake, future)

    def get(self) -> object:
        with self._cond:
            while not self._items:
                self._cond.wait()
            return self._items.popleft()

    async def aget(self) -> object:
        while True:
            with self._cond:
                if self._items:
                    return self._items.popleft()
                loop = asyncio.get_running_loop()
                future = loop.create_future()
                self._waiter = (loop, future)
            await future


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class SpeechStream:
    """The audio of one request, as chunks, while it is generated.

    ``cancel()`` (alias ``close()``) from any thread makes the scheduler drop the request at its next
    frame step and free its slot; so do leaving a ``with`` / ``async with`` block and cancelling the
    task that awaits it. Iteration stops at once after a cancel (buffered audio is dropped).
    ``final`` is True on the last chunk when the utterance ended by itself (end of speech or a
    length limit); iteration stops at the end either way. Each chunk carries the words it covers
    (``AudioChunk.words``, estimated timings).

    ``watermark``: the engine's marker and this utterance's watermark state, for a watermarked
    request (the marker marks its chunks on their way out).
    """

    def __init__(
        self,
        request: SynthesisRequest,
        seed: int,
        num_codebooks: int,
        on_cancel: Callable[[], None],
        watermark: tuple[StepMarker, StreamWatermarker] | None = None,
    ) -> None:
        self.request = request
        self.num_codebooks = num_codebooks
        self.stats = StreamStats(seed=seed)
        self.submitted_at = time.perf_counter()
        self.cancelled = threading.Event()  # the scheduler must drop the request (the caller's or the engine's doing)
        self.mailbox = Mailbox()
        self.marker, self.watermark = watermark if watermark is not None else (None, None)
        self._codes: list[np.ndarray] = []
        self._on_cancel = on_cancel
        self._outcome = threading.Lock()  # the scheduler records an end, the marker a failed chunk
        self._aborted = False  # the engine failed it after its step (its watermark): that is its outcome
        self._stopped = False  # the caller cancelled: iteration stops at once
        self._ended = False
        self._aligner = WordAligner(request.text)
        self._end_frame = 0  # frames handed to the caller so far
        self._sizes = request.chunks.sizes()  # the chunk sizes, drawn as chunks are cut
        self._want = next(self._sizes)
        self._pieces: list[np.ndarray] = []  # frames generated since the last chunk
        self.delivered_frames = 0  # frames handed out in chunks so far
        self.first_chunk_at: float | None = None  # when the scheduler handed out the first chunk
        # Seconds of this stream's audio its listener has played, where the caller knows (a player's
        # clock); None: real time from the first chunk (the scheduler's deadlines, deadline.py).
        self.playout: Callable[[], float] | None = None
        self._admission: bool | None = None  # True: it got a slot; False: it ended without one
        self._admission_news = Mailbox()  # wakes wait_admitted

    # -- scheduler side -----------------------------------------------------------------------

    def admit(self) -> None:
        """The request has an engine slot (its queue wait is over): wakes ``wait_admitted``."""
        self._settle_admission(True)

    def _settle_admission(self, admitted: bool) -> None:
        if self._admission is None:
            self._admission = admitted
            self._admission_news.put(None)

    def add_codes(self, codes: np.ndarray) -> None:
        self._codes.append(codes)

    def push_frame(self, pcm: np.ndarray, now: float, last: bool = False) -> None:
        """One more frame of audio; a chunk goes out when the request's chunk schedule says so, but
        not after its ``last`` frame: that goes out with the end, as the final chunk."""
        self._pieces.append(pcm)
        self.stats.frames += 1
        if not last and len(self._pieces) >= self._want:
            self.flush(final=False)
            self._want = next(self._sizes)
            if self.first_chunk_at is None:
                self.first_chunk_at = now

    def played_s(self, now: float) -> float:
        """Audio the listener has played by ``now`` (perf_counter seconds): the caller's playout
        clock if it set one, else real time since the first chunk."""
        if self.first_chunk_at is None:
            return 0.0
        if self.playout is not None:
            return self.playout()
        return now - self.first_chunk_at

    @property
    def frames_to_next_chunk(self) -> int:
        """Frames still to generate before the next chunk goes out."""
        return self._want - len(self._pieces)

    def flush(self, final: bool) -> None:
        """Hand out the frames generated since the last chunk (if any) as a chunk."""
        if not self._pieces:
            return
        audio = np.concatenate(self._pieces)
        frames, self._pieces = len(self._pieces), []
        self.deliver(AudioChunk(audio, start_frame=self.delivered_frames, frames=frames, final=final))
        self.delivered_frames += frames

    def deliver(self, chunk: AudioChunk) -> None:
        self._send(chunk)

    def drop_pending(self) -> None:
        """Forget frames not yet handed out (the request was cancelled or failed)."""
        self._pieces = []

    def end(self, reason: str) -> None:
        if self._record(reason):
            self._send(StreamEnd(reason))
        self._settle_admission(False)

    def fail(self, exc: BaseException) -> None:
        if self._record("error"):
            self._send(exc)
        self._settle_admission(False)

    def _send(self, item: object) -> None:
        """Towards the caller: through the marker when watermarked (it keeps the order), else straight."""
        if self.marker is not None:
            self.marker.submit(self, item)
        else:
            self.mailbox.put(item)

    def _record(self, reason: str) -> bool:
        """Record how the request ended; False (nothing to send) if a failed watermark ended it first."""
        with self._outcome:
            if self._aborted:
                return False
            self.stats.stop_reason = reason
            self.stats.elapsed_s = time.perf_counter() - self.submitted_at
            return True

    # -- marker side --------------------------------------------------------------------------

    def abort(self, exc: BaseException) -> None:
        """A chunk could not be watermarked: the request ends with ``exc`` (which the marker hands
        to the caller after the chunks before it) and is cancelled, so the scheduler frees its slot.
        It overrides an end recorded just before: the caller sees the error, not that end."""
        with self._outcome:
            self._aborted = True
            self.stats.stop_reason = StopReason.ERROR
            self.stats.elapsed_s = time.perf_counter() - self.submitted_at
        self.cancelled.set()
        self._on_cancel()

    # -- caller side ------------------------------------------------------------------------

    @property
    def codes(self) -> np.ndarray:
        """The frames generated so far, (frames, K) int64, exactly as the model sampled them."""
        if not self._codes:
            return np.zeros((0, self.num_codebooks), dtype=np.int64)
        return np.stack(self._codes)

    @property
    def done(self) -> bool:
        return self._ended

    @property
    def queued(self) -> bool:
        """Still waiting for an engine slot (being prepared, or queued behind other requests): a
        caller's timeout for the first audio should not run yet."""
        return self._admission is None and not self.cancelled.is_set()

    async def wait_admitted(self) -> bool:
        """Wait until the request has an engine slot (True) or has ended without one (False): where
        a caller's timeout for the first audio may start. One waiter at a time."""
        while self._admission is None:
            await self._admission_news.aget()
        return self._admission

    def cancel(self) -> None:
        self._stopped = True
        if not self.cancelled.is_set() and not self._ended:
            self.cancelled.set()
            self._on_cancel()

    close = cancel

    def _take(self, item: object) -> AudioChunk | None:
        if isinstance(item, AudioChunk):
            if self.stats.time_to_first_audio_s is None:  # as the caller gets it (watermarked, if asked)
                self.stats.time_to_first_audio_s = time.perf_counter() - self.submitted_at
            return self._with_words(item)
        self._ended = True
        # as the caller sees the end: after every chunk, however long the marker held them
        self.stats.elapsed_s = max(self.stats.elapsed_s, time.perf_counter() - self.submitted_at)
        if isinstance(item, BaseException):
            raise item
        if (
            isinstance(item, StreamEnd)
            and item.reason == StopReason.EOS
            and self._end_frame
            and self._aligner.remaining
        ):
            # End of speech came right after a chunk: its last words come with an empty final chunk.
            words = self._aligner.advance(self._end_frame * FRAME_MS / 1000, ended=True)
            return AudioChunk(np.zeros(0, dtype=np.float32), self._end_frame, 0, True, words=words)
        return None

    def _with_words(self, chunk: AudioChunk) -> AudioChunk:
        self._end_frame = chunk.start_frame + chunk.frames
        # A final chunk ends the sentence by itself unless a length limit cut it: then the words
        # that did not fit were never spoken, and are not handed out.
        cut = (
            self._end_frame >= self.request.max_frames or self.stats.prompt_frames - 1 + self._end_frame >= MAX_SEQ_LEN
        )
        words = self._aligner.advance(self._end_frame * FRAME_MS / 1000, ended=chunk.final and not cut)
        return replace(chunk, words=words) if words else chunk

    def __iter__(self) -> SpeechStream:
        return self

    def __next__(self) -> AudioChunk:
        if self._ended or self._stopped:
            raise StopIteration
        chunk = self._take(self.mailbox.get())
        if chunk is None:
            raise StopIteration
        return chunk

    def __aiter__(self) -> SpeechStream:
        return self

    async def __anext__(self) -> AudioChunk:
        if self._ended or self._stopped:
            raise StopAsyncIteration
        try:
            chunk = self._take(await self.mailbox.aget())
            if chunk is None:
                raise StopAsyncIteration
            return chunk
        except asyncio.CancelledError:
            self.cancel()
            raise

    def __enter__(self) -> SpeechStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    async def __aenter__(self) -> SpeechStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    async def aclose(self) -> None:
        self.cancel()

    def __del__(self) -> None:
        if not self._ended and not self.cancelled.is_set():
            self.cancel()

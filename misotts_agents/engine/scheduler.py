"""The scheduler thread: continuous batching of every active request, one frame per step.

It alone touches the model, the KV cache and the streaming Mimi state. Each iteration it

1. drops cancelled requests, prefilling or speaking (their slot is free for the next iteration),
2. admits prepared requests into free slots (no model work: a slot is a cache row),
3. runs one bounded prefill pass (prefill.py): the next chunks of several joiners' prompts in one
   batched forward, sized so that the streams already speaking are not stalled; a cached voice
   prefix is copied into the row instead of recomputed; a row whose prompt is in joins the step,
4. runs one batched frame step for every prefilled, unpaced row (step.py: static shapes per batch
   bucket, a CUDA graph on CUDA): backbone decode at per-row positions, the depth decoder for all
   rows at once; then one Mimi decode call for all rows,
5. hands each row's audio to its stream in chunks and ends rows at end-of-speech or their limit.

Prompt preparation (tokenising, Mimi-encoding context audio) happens before, on another thread.
An exception in a step fails the requests of that step, not the engine; one in a prefill pass
fails only the request it belongs to (a failed batched pass is retried row by row).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from misotts_agents.audio import FRAME_MS
from misotts_agents.engine.params import sampling_kwargs
from misotts_agents.engine.prompt import Prompt
from misotts_agents.engine.request import AudioChunk
from misotts_agents.engine.step import FrameStepper
from misotts_agents.engine.stream import SpeechStream
from misotts_agents.engine.voice import CachedVoice, VoiceCache
from misotts_agents.errors import EngineClosed
from misotts_agents.model import codec
from misotts_agents.model.config import MAX_SEQ_LEN
from misotts_agents.model.sampling import SamplingState
from misotts_agents.model.transformer import MisoModel

log = logging.getLogger(__name__)

STATS_LOG_INTERVAL_S = 30.0  # while busy, the engine's figures go to the log this often


@dataclass(eq=False)
class Job:
    """A request between preparation and its end (scheduler-internal)."""

    stream: SpeechStream
    prompt: Prompt | None = None
    voice: CachedVoice | None = None
    slot: int | None = None
    frames: int = 0
    chunk_start: int = 0
    pieces: list[np.ndarray] = field(default_factory=list)
    sizes: Iterator[int] | None = None
    want: int = 1
    first_audio_at: float | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load and throughput."""

    active: int
    queued: int
    max_batch: int
    steps: int
    frames: int
    steps_per_s: float
    frames_per_s: float
    voices_cached: int
    voice_cache_hits: int
    completed: int
    cancelled: int
    failed: int


class Scheduler:
    def __init__(
        self,
        model: MisoModel,
        decoder: codec.MimiStreamDecoder,
        voices: VoiceCache,
        max_batch: int,
        cuda_graphs: bool | None = None,
        compile: bool | None = None,
        batch_buckets: bool = False,
    ):
        """``model`` must have KV caches for ``max_batch`` rows: slot i is cache row i (step.py)."""
        self.model = model
        self.decoder = decoder
        self.voices = voices
        self.max_batch = max_batch
        self.device = model.device
        k = model.num_codebooks
        self.k = k
        dev = self.device
        self.stepper = FrameStepper(
            model, max_batch, cuda_graphs=cuda_graphs, compile=compile, buckets=batch_buckets
        )
        # Per slot: the next backbone input frame, its position (host ints: no sync), sampling settings.
        self.next_tokens = torch.zeros(max_batch, 1, k + 1, dtype=torch.long, device=dev)
        self.next_mask = torch.zeros(max_batch, 1, k + 1, dtype=torch.bool, device=dev)
        self.audio_mask = torch.ones(1, k + 1, dtype=torch.bool, device=dev)
        self.audio_mask[0, k] = False
        self.positions = [0] * max_batch
        self.sampling = SamplingState.empty(max_batch, dev)
        self.jobs: dict[int, Job] = {}
        self.free = list(range(max_batch))
        self.ready: deque[Job] = deque()
        self.wake = threading.Event()
        self._lock = threading.Lock()  # guards `ready` and the counters read by stats()
        self._stopping = False
        self._step_times: deque[tuple[float, int]] = deque(maxlen=64)
        self.steps = self.total_frames = self.completed = self.cancelled = self.failed = 0
        self.thread = threading.Thread(target=self._run, name="misotts-scheduler", daemon=True)
        self.thread.start()

    # -- called from other threads ----------------------------------------------------------

    def enqueue(self, job: Job) -> None:
        with self._lock:
            self.ready.append(job)
        self.wake.set()

    def load(self) -> tuple[int, int]:
        """Requests in a slot and requests prepared and waiting for one (the engine's admission check)."""
        with self._lock:
            return len(self.jobs), len(self.ready)

    def reject(self, job: Job, error: BaseException) -> None:
        """End a request that failed before it reached the scheduler (bad input found in preparation)."""
        self._count("failed")
        job.stream.fail(error)

    def _count(self, outcome: str) -> None:
        """One more ``completed`` / ``cancelled`` / ``failed`` request, under the lock: the
        preparation threads count too (``reject``), and ``stats`` reads them from any thread."""
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + 1)

    def stop(self) -> None:
        self._stopping = True
        self.wake.set()
        self.thread.join()

    def stats(self, queued_elsewhere: int) -> EngineStats:
        with self._lock:
            times = list(self._step_times)
            queued = len(self.ready) + queued_elsewhere
            steps, frames = self.steps, self.total_frames
            completed, cancelled, failed = self.completed, self.cancelled, self.failed
        span = times[-1][0] - times[0][0] if len(times) > 1 else 0.0
        steps_per_s = (len(times) - 1) / span if span > 0 else 0.0
        frames_per_s = sum(n for _, n in times[1:]) / span if span > 0 else 0.0
        return EngineStats(
            active=len(self.jobs),
            queued=queued,
            max_batch=self.max_batch,
            steps=steps,
            frames=frames,
            steps_per_s=steps_per_s,
            frames_per_s=frames_per_s,
            voices_cached=len(self.voices),
            voice_cache_hits=self.voices.hits,
            completed=completed,
            cancelled=cancelled,
            failed=failed,
        )

    # -- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        next_report = time.monotonic() + STATS_LOG_INTERVAL_S
        with torch.inference_mode():
            while not self._stopping:
                if time.monotonic() >= next_report and self.jobs:
                    log.info("engine: %s", self.stats(0))
                    next_report = time.monotonic() + STATS_LOG_INTERVAL_S
                self.wake.clear()
                self._drop_cancelled()
                self._admit()
                runnable, wait = self._runnable()
                if not runnable:
                    self.wake.wait(timeout=wait)
                    continue
                try:
                    self._step(runnable)
                except Exception as exc:  # a failure outside what _step isolates: never the engine
                    log.exception("frame step failed; ending the %d requests in it", len(runnable))
                    for slot in runnable:
                        job = self.jobs.get(slot)  # rows the step already ended are gone
                        if job is not None:
                            self._finish(job, error=exc)
            self._shutdown()

    def _shutdown(self) -> None:
        closed = EngineClosed("the engine was closed")
        for job in list(self.jobs.values()):
            self._finish(job, error=closed)
        with self._lock:
            pending, self.ready = list(self.ready), deque()
        for job in pending:
            job.stream.fail(closed)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.jobs.values() if j.stream.cancelled.is_set()]:
            self._finish(job, reason="cancelled")
        with self._lock:
            keep = deque(j for j in self.ready if not j.stream.cancelled.is_set())
            dropped = [j for j in self.ready if j.stream.cancelled.is_set()]
            self.ready = keep
        for job in dropped:
            self._count("cancelled")
            job.stream.end("cancelled")

    def _admit(self) -> None:
        # While others are running, admit one request per step so the batch is never stalled by
        # more than one prefill; when idle, fill every free slot at once.
        budget = 1 if self.jobs else self.max_batch
        while budget and self.free:
            with self._lock:
                if not self.ready:
                    return
                job = self.ready.popleft()
            if job.stream.cancelled.is_set():  # cancelled since the last sweep (maybe unprepared)
                self._count("cancelled")
                job.stream.end("cancelled")
                continue
            budget -= 1
            slot = self.free.pop(0)
            job.slot = slot
            self.jobs[slot] = job
            try:
                self._prefill(job)
            except Exception as exc:
                log.exception("prefill failed; ending its request alone")
                self._finish(job, error=exc)

    def _prefill(self, job: Job) -> None:
        """Fill the slot's cache row with every prompt frame but the last; the last is the input of
        the slot's first frame step, so prefill never computes a hidden state nobody needs."""
        stream, prompt, slot = job.stream, job.prompt, job.slot
        request = stream.request
        stream.stats.queued_s = time.perf_counter() - stream.submitted_at
        rows = torch.tensor([slot], device=self.device)
        tokens = prompt.tokens.to(self.device).unsqueeze(0)
        mask = prompt.mask.to(self.device).unsqueeze(0)
        start, end = 0, prompt.length - 1
        if job.voice is not None:
            start = prompt.prefix_len
            if job.voice.kv is None:  # first use of this voice: compute its prefix once, keep it
                self._forward(tokens, mask, 0, start, rows)
                job.voice.kv = self.model.backbone.export_prefix(slot, start)
            else:
                self.model.backbone.import_prefix(slot, job.voice.kv)
        self._forward(tokens, mask, start, end, rows)
        self.next_tokens[slot] = tokens[0, end:]
        self.next_mask[slot] = mask[0, end:]
        self.positions[slot] = end
        self.sampling.set_row(slot, **{**sampling_kwargs(request), "seed": stream.stats.seed, "frame": 0})
        self.decoder.reset([slot])
        job.sizes = request.chunks.sizes()
        job.want = next(job.sizes)

    def _forward(self, tokens: torch.Tensor, mask: torch.Tensor, start: int, end: int, rows: torch.Tensor) -> None:
        if end > start:
            pos = torch.arange(start, end, device=self.device).unsqueeze(0)
            self.model.backbone_last_hidden(tokens[:, start:end], mask[:, start:end], pos, rows)

    def _runnable(self) -> tuple[list[int], float | None]:
        """Slots to step now, and (if none) how long to sleep before pacing lets one run."""
        now = time.perf_counter()
        runnable, wait = [], None
        for slot, job in sorted(self.jobs.items()):
            ahead = job.stream.request.max_ahead_s
            if ahead is not None and job.first_audio_at is not None:
                lead = job.frames * FRAME_MS / 1000 - (now - job.first_audio_at) - ahead
                if lead > 0:
                    wait = lead if wait is None else min(wait, lead)
                    continue
            runnable.append(slot)
        return runnable, wait

    def _step(self, slots: list[int]) -> None:
        """One frame for every row in ``slots``; a failure never ends the engine, and ends the
        requests it did not come from only when it cannot be avoided.

        A failure of the batched computation is retried once without the newest request (the one
        whose arrival most likely brought it: a new shape, a bad value, the memory it added); only if
        that fails too are the others failed. A failure in one row's own bookkeeping (chunking,
        delivery) ends that request alone.
        """
        try:
            codes, pcm = self._compute(slots)
        except Exception as exc:
            newest = max(slots, key=lambda s: self.jobs[s].stream.submitted_at)
            log.exception("frame step failed; ending the newest of its %d requests and retrying", len(slots))
            self._finish(self.jobs[newest], error=exc)
            slots = [s for s in slots if s != newest]
            if not slots:
                return
            try:
                codes, pcm = self._compute(slots)
            except Exception as again:
                log.exception("frame step failed again; ending the %d requests in it", len(slots))
                for slot in slots:
                    self._finish(self.jobs[slot], error=again)
                return
        self._commit(slots, codes, pcm)

    def _compute(self, slots: list[int]) -> tuple[torch.Tensor, np.ndarray]:
        """The batched part of a step: the model's frame step and one Mimi decode for all rows.

        It changes no scheduler state (positions, inputs and sampling counters advance in
        ``_commit``), so it can be run again with fewer rows: the KV entries it wrote are
        rewritten at the same positions, and the keyed sampling draws the same codes again.
        """
        dev, k = self.device, self.k
        rows = torch.tensor(slots, device=dev)
        pos = torch.tensor([self.positions[s] for s in slots], device=dev).unsqueeze(1)
        sampling = self.sampling.select(rows)
        codes = self.stepper(rows, self.next_tokens[rows], self.next_mask[rows], pos, sampling)  # (b, K)
        speaking = codes.any(dim=1)
        audio_codes = codes * (codes < codec.CODEBOOK_SIZE)  # ids 2048..2050 are not Mimi codes
        batch = torch.zeros(self.max_batch, k, dtype=torch.long, device=dev)
        batch[rows] = audio_codes
        active = torch.zeros(self.max_batch, dtype=torch.bool, device=dev)
        active[rows] = speaking
        # in range by construction: Mimi is queued right behind the step, the host waits once, here
        pcm = self.decoder.decode(batch, active, validate=False).float().cpu().numpy()
        return codes, pcm

    def _commit(self, slots: list[int], codes: torch.Tensor, pcm: np.ndarray) -> None:
        rows = torch.tensor(slots, device=self.device)
        for s in slots:
            self.positions[s] += 1
        self.next_tokens[rows, 0, : self.k] = codes
        self.next_mask[rows] = self.audio_mask
        self.sampling.advance(rows)
        codes_np = codes.cpu().numpy()
        speaking_np = codes_np.any(axis=1)
        now = time.perf_counter()
        with self._lock:  # counted before any stream hears of this step's audio
            self.steps += 1
            self.total_frames += int(speaking_np.sum())
            self._step_times.append((now, int(speaking_np.sum())))
        for i, slot in enumerate(slots):
            job = self.jobs[slot]
            try:
                self._advance(job, codes_np[i], pcm[slot], bool(speaking_np[i]), now)
            except Exception as exc:  # this request's own bookkeeping: it alone ends
                log.exception("request failed after its frame step; ending it alone")
                self._finish(job, error=exc)

    def _advance(self, job: Job, codes: np.ndarray, pcm: np.ndarray, speaking: bool, now: float) -> None:
        """One row's frame: its codes and audio to its stream, a chunk when one is due, or its end."""
        if not speaking:
            self._finish(job, reason="eos")
            return
        job.stream.add_codes(codes)
        job.stream.stats.invalid_codes += int((codes >= codec.CODEBOOK_SIZE).sum())
        job.frames += 1
        job.stream.stats.frames = job.frames
        job.pieces.append(pcm)
        if job.frames >= job.stream.request.max_frames:
            self._finish(job, reason="max_frames")
        elif self.positions[job.slot] >= MAX_SEQ_LEN:
            self._finish(job, reason="context_full")
        elif len(job.pieces) >= job.want:
            self._flush(job, final=False)
            job.want = next(job.sizes)
            if job.first_audio_at is None:
                job.first_audio_at = now

    def _flush(self, job: Job, final: bool) -> None:
        if not job.pieces:
            return
        audio = np.concatenate(job.pieces)
        job.stream.deliver(AudioChunk(audio, start_frame=job.chunk_start, frames=len(job.pieces), final=final))
        job.chunk_start += len(job.pieces)
        job.pieces = []

    def _finish(self, job: Job, reason: str = "", error: BaseException | None = None) -> None:
        # The stream learns its outcome before the slot is reused, so anyone who sees the slot
        # free also sees the stream's final state. The last chunk goes first: if delivering it
        # fails, nothing is counted yet and the caller ends the request with that error.
        if error is None and reason != "cancelled":
            self._flush(job, final=True)
        if error is not None:
            self._count("failed")
            job.stream.fail(error)
        elif reason == "cancelled":
            self._count("cancelled")
            job.stream.end(reason)
        else:
            self._count("completed")
            job.stream.end(reason)
        job.pieces = []
        slot = job.slot
        if slot is not None and self.jobs.get(slot) is job:
            del self.jobs[slot]
            self.free.append(slot)
            self.free.sort()
        s = job.stream.stats
        log.debug(
            "request done: %s, %d frames, queued %.3f s, first audio %s, RTF %s",
            s.stop_reason,
            s.frames,
            s.queued_s or 0.0,
            f"{s.time_to_first_audio_s:.3f} s" if s.time_to_first_audio_s is not None else "n/a",
            f"{s.real_time_factor:.2f}" if s.real_time_factor is not None else "n/a",
        )

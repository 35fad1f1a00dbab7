"""The scheduler thread: what runs next. Continuous batching of every request, one frame per step.

It alone touches the model, the KV cache and the streaming Mimi state, through the executor
(executor.py: the device side, queued and never waited for but once per step). Each iteration it

1. drops cancelled requests (their slot is free for the next iteration), and refuses as busy the
   requests that waited longer than ``max_wait_s`` for a slot,
2. admits waiting requests into free slots, in turn across tenants and their clients
   (admission.py; a slot is a cache row: no model work),
3. prefills joiners' prompts in bounded passes (prefill.py), nearest to first audio first, for as
   long as the speaking streams' playout deadlines allow (deadline.py): a stream far ahead of its
   listener lends the device to joiners, one about to run out (or with no audio yet) does not;
4. queues one batched frame step for every prefilled, unpaced row (step.py: static shapes, a CUDA
   graph on CUDA) and its Mimi decode,
5. reads a step's codes and audio and hands each row's frame to its stream (which cuts chunks),
   ending rows at end-of-speech or their limit; with watermarking, the chunks handed out in the
   iteration then go to the marker as one batch (marking.py, its own thread).

**Overlap** (on CUDA by default). Nothing in 1-4 waits for the device: each step's inputs for the
next step advance on the device right after it is queued (executor.py), so step 4 of iteration i+1
is queued *before* the host reads step i's results in 5, and the host's per-row work and the next
prefill run while the device computes. The cost is bookkeeping, not audio: a row that ended in
step i has already been queued in step i+1, whose result for it is dropped, and a row's limits
(frames, context) are checked on the host before it is queued. On CPU queuing a step runs it, and
the loop reads each step at once (``overlap=True`` runs the CUDA schedule on CPU, for tests).

Prompt preparation (tokenising, Mimi-encoding context audio) happens before, on other threads.
An exception in a step fails the requests of that step, not the engine; one in a prefill pass
fails only the request it belongs to (a failed batched pass is retried row by row).
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import torch

from misotts_agents.audio import FRAME_MS
from misotts_agents.engine.admission import WaitingQueue
from misotts_agents.engine.deadline import SLACK_FLOOR_S, lendable_s, prefill_allowance_s
from misotts_agents.engine.device import DeviceClock
from misotts_agents.engine.executor import Executor, Frame, InFlight
from misotts_agents.engine.job import Job, JobState
from misotts_agents.engine.marking import StepMarker
from misotts_agents.engine.params import sampling_kwargs
from misotts_agents.engine.prefill import Candidate, PrefillBudget, PrefillChunk, context_scale, plan_pass
from misotts_agents.engine.request import StopReason
from misotts_agents.engine.stats import EngineCounters, EngineStats
from misotts_agents.engine.voice import VoiceCache
from misotts_agents.errors import EngineBusy, EngineClosed
from misotts_agents.model import codec
from misotts_agents.model.config import MAX_SEQ_LEN
from misotts_agents.model.mimi_stream import MimiStreamDecoder
from misotts_agents.model.transformer import MisoModel

log = logging.getLogger(__name__)

STATS_LOG_INTERVAL_S = 30.0  # while busy, the engine's figures go to the log this often
DEFAULT_MAX_WAIT_S = 10.0  # a request that waits longer for a slot is refused as busy (retryable)
MAX_PASSES_PER_ITERATION = 8  # prefill passes between two frame steps, however much slack there is


class Scheduler:
    def __init__(
        self,
        model: MisoModel,
        decoder: MimiStreamDecoder,
        voices: VoiceCache,
        max_batch: int,
        cuda_graphs: bool | None = None,
        compile: bool | None = None,
        batch_buckets: bool = False,
        prefill_chunk: PrefillChunk = "auto",
        overlap: bool | None = None,
        marker: StepMarker | None = None,
        fair: bool = True,
        max_wait_s: float | None = DEFAULT_MAX_WAIT_S,
        slack_floor_s: float = SLACK_FLOOR_S,
    ):
        """``model`` must have KV caches for ``max_batch`` rows: slot i is cache row i (step.py).

        ``prefill_chunk`` bounds each prefill pass while others speak (prefill.py): "auto" (sized
        from measured times, and stretched by the speaking streams' slack above ``slack_floor_s``),
        a number of positions, or 0 / None for whole prompts. ``overlap`` (default: on CUDA) queues
        each step before reading the one before. ``marker`` (marking.py) is told when each
        iteration's chunks are out, so it marks them together. ``fair``: admission in turn across
        tenants and clients (admission.py), else first come, first served. ``max_wait_s``: how
        long a prepared request may wait for a slot before it is refused as busy (None: forever).
        """
        if max_wait_s is not None and not max_wait_s > 0:
            raise ValueError(f"max_wait_s must be positive or None, got {max_wait_s!r}")
        self.executor = Executor(model, decoder, max_batch, cuda_graphs, compile, batch_buckets)
        self.marker = marker
        self.voices = voices
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.slack_floor_s = slack_floor_s
        self.overlap = model.device.type == "cuda" if overlap is None else overlap  # may be switched at any time
        self.clock = DeviceClock(model.device)
        self.in_flight: InFlight[Job] | None = None  # the step queued last, while overlapping
        self.running: dict[int, Job] = {}  # by slot
        self.free = list(range(max_batch))
        self.waiting: WaitingQueue[Job] = WaitingQueue(fair)
        self.prefill_budget = PrefillBudget(prefill_chunk, context_scale(model.config.backbone))
        self._admissions = 0
        self.wake = threading.Event()
        self.counts = EngineCounters()
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="misotts-scheduler", daemon=True)
        self.thread.start()

    # -- called from other threads ----------------------------------------------------------

    def enqueue(self, job: Job) -> None:
        """A prepared request waits for a slot."""
        job.state = JobState.WAITING
        self.waiting.push(job, job.tenant, job.client)
        self.wake.set()

    def load(self) -> tuple[int, int]:
        """Requests in a slot and requests prepared and waiting for one (the engine's admission check)."""
        return len(self.running), len(self.waiting)

    def reject(self, job: Job, error: BaseException) -> None:
        """End a request that failed before it reached the scheduler (bad input found in preparation)."""
        self._end_unadmitted(job, error)

    def _end_unadmitted(self, job: Job, error: BaseException | None = None) -> None:
        """End a request that never had a slot: cancelled (no ``error``) or failed."""
        self.counts.ended("cancelled" if error is None else "failed")
        job.state = JobState.ENDED
        if error is None:
            job.stream.end(StopReason.CANCELLED)
        else:
            job.stream.fail(error)

    def stop(self) -> None:
        self._stopping = True
        self.wake.set()
        self.thread.join()

    def stats(self, queued_elsewhere: int) -> EngineStats:
        queued = len(self.waiting) + queued_elsewhere
        return self.counts.snapshot(len(self.running), queued, self.max_batch, len(self.voices), self.voices.hits)

    # -- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        next_report = time.monotonic() + STATS_LOG_INTERVAL_S
        with torch.inference_mode():
            while not self._stopping:
                if time.monotonic() >= next_report and self.running:
                    log.info("engine: %s", self.stats(0))
                    next_report = time.monotonic() + STATS_LOG_INTERVAL_S
                self.wake.clear()
                self.clock.collect()
                self._drop_cancelled()
                self._admit()
                self._refuse_overdue()
                self._prefill()
                runnable, wait = self._runnable()
                try:
                    idle = self._step_and_read(runnable)
                except Exception as exc:  # a failure outside what _step and _read isolate: never the engine
                    self.in_flight = None  # a step's results may be lost: no row in a step may go on
                    speaking = [job for job in self.running.values() if job.speaking]
                    log.exception("frame step failed; ending the %d requests speaking", len(speaking))
                    for job in speaking:
                        self._finish(job, error=exc)
                    idle = False
                if self.marker is not None:  # this iteration's chunks (its step's) are out: mark them together
                    self.marker.end_step()
                if idle:
                    self.wake.wait(timeout=self._idle_wait(wait))
            self._shutdown()

    def _idle_wait(self, pacing: float | None) -> float | None:
        """How long an idle loop may sleep: until pacing lets a row run, or the oldest waiting
        request's wait ends (it is refused then, not later)."""
        if self.max_wait_s is None:
            return pacing
        if (oldest := min((job.stream.submitted_at for job in self.waiting), default=None)) is None:
            return pacing
        due = max(oldest + self.max_wait_s - time.perf_counter(), 0.0) + 1e-3
        return due if pacing is None else min(due, pacing)

    def _step_and_read(self, runnable: list[int]) -> bool:
        """Queue a step for ``runnable`` (if any) and read the one queued before it (overlapping)
        or itself; True when there was nothing to do (no step, no prefill waiting: sleep)."""
        queued = None
        if runnable:  # the step's time on the device's main stream (with Mimi on CPU; beside it on CUDA)
            with self.clock.measure(self.prefill_budget.observe_step):
                queued = self._step(runnable)
        previous, self.in_flight = self.in_flight, None
        if previous is not None:  # overlapping: read the step before while this one runs
            self._read(previous)
        if queued is not None and self.overlap:
            self.in_flight = queued
        elif queued is not None:
            self._read(queued)
        return queued is None and previous is None and all(job.speaking for job in self.running.values())

    def _shutdown(self) -> None:
        self.in_flight = None  # its rows end below; their results are not wanted
        try:  # the decoder's state is released after this returns
            self.executor.synchronize()
        except Exception:  # a failed device: the requests below must still end
            log.exception("waiting for Mimi's stream at shutdown failed")
        closed = EngineClosed("the engine was closed")
        for job in list(self.running.values()):
            self._finish(job, error=closed)
        for job in self.waiting.drain():
            self._end_unadmitted(job, closed)

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.running.values() if j.stream.cancelled.is_set()]:
            self._finish(job, reason=StopReason.CANCELLED)
        for job in self.waiting.remove_if(lambda j: j.stream.cancelled.is_set()):
            self._end_unadmitted(job)

    def _admit(self) -> None:
        """Give waiting requests the free slots (their cache rows), in turn (admission.py);
        prefill happens in passes."""
        while self.free:
            job = self.waiting.pop()
            if job is None:
                return
            if job.stream.cancelled.is_set():  # cancelled since the last sweep
                self._end_unadmitted(job)
                continue
            job.slot = self.free.pop(0)
            job.state = JobState.PREFILLING
            job.admitted = self._admissions
            self._admissions += 1
            job.stream.stats.queued_s = time.perf_counter() - job.stream.submitted_at
            self.running[job.slot] = job
            job.stream.admit()

    def _refuse_overdue(self) -> None:
        """Requests still waiting for a slot after ``max_wait_s`` end as busy: the caller hears it
        and may retry (or go elsewhere) instead of waiting unseen."""
        if self.max_wait_s is None:
            return
        deadline = time.perf_counter() - self.max_wait_s
        for job in self.waiting.remove_if(lambda j: j.stream.submitted_at < deadline):
            busy = EngineBusy(
                f"engine busy: no slot free within {self.max_wait_s:g} s "
                f"({len(self.running)} generating, {len(self.waiting)} waiting); retry later or add capacity"
            )
            self._end_unadmitted(job, busy)

    # -- prefill --------------------------------------------------------------------------------

    def _prefill(self) -> None:
        """Prefill passes over the rows still prefilling (prefill.py), for as long as the speaking
        streams' deadlines allow (deadline.py)."""
        budget = self.prefill_budget
        if budget.whole_prompts:
            self._prefill_whole()
            return
        speaking_streams = [j.stream for j in self.running.values() if j.speaking]
        began, predicted = time.perf_counter(), 0.0  # passes' time: the host clock, or predicted (GPU)
        lendable = lendable_s(speaking_streams, began, budget.step_s, self.slack_floor_s)
        for n in range(MAX_PASSES_PER_ITERATION):
            allowance = prefill_allowance_s(lendable, spent_s=max(time.perf_counter() - began, predicted))
            if n and allowance <= 0:
                return
            candidates = [
                Candidate(job, job.written, job.prefill_stop, job.prefill_end - job.written, job.admitted)
                for job in sorted(self._joining(), key=lambda j: j.admitted)
                if self._startable(job) and not job.speaking
            ]
            if not candidates:
                return
            filled = max(c.filled for c in candidates)
            limit = budget.positions(bool(speaking_streams), filled, allowance, share=n == 0)
            plan, width = plan_pass(candidates, limit, MAX_SEQ_LEN)
            if not plan:
                return
            self._run_pass([(c.key, length) for c, length in plan], width)
            cost = budget.cost_s(len(plan) * width, filled + width / 2)
            if not speaking_streams or cost is None or not isinstance(budget.setting, str):
                return  # nobody to protect (one pass takes everything), nothing known yet, or fixed chunks
            predicted += cost

    def _prefill_whole(self) -> None:
        """Whole prompts, one request per iteration while others speak (the schedule before chunking)."""
        speaking = any(job.speaking for job in self.running.values())
        for job in sorted(self._joining(), key=lambda j: j.admitted):
            while self._startable(job) and job.state is JobState.PREFILLING:
                n = job.prefill_stop - job.written
                self._run_pass([(job, n)], n)
            if speaking and job.state is not JobState.PREFILLING:
                return

    def _joining(self) -> list[Job]:
        return [job for job in self.running.values() if job.state is JobState.PREFILLING]

    def _startable(self, job: Job) -> bool:
        """Start the job's prefill if it has not started: copy its voice's cached prefix, or take on
        computing it. False while another request computes the same voice (it waits for the copy)."""
        if job.filled is not None:
            return True
        voice, key = job.voice, job.voice_key
        try:
            if voice is not None and key is not None and self.voices.shared_prefix(key, voice) is not None:
                self.executor.import_prefix(job.row, voice.kv or [])
                job.filled = job.ready_prompt.prefix_len
            elif voice is not None and key is not None:
                if not self.voices.claim(key):
                    return False
                job.computes_voice = True
                job.filled = 0
            else:
                job.filled = 0
            if job.filled >= job.prefill_end:
                self._start_speaking(job)
        except Exception as exc:
            log.exception("request failed starting its prefill; ending it alone")
            self._finish(job, error=exc)
            return False
        return True

    def _run_pass(self, chunks: list[tuple[Job, int]], width: int) -> None:
        """One batched forward of each job's next ``n`` positions; a failure ends only its request:
        a failed batched pass is retried row by row (the KV it wrote lies beyond what is filled)."""
        try:
            context = sum(job.written for job, _ in chunks) / len(chunks) + width / 2
            positions = len(chunks) * width
            with self.clock.measure(lambda seconds: self.prefill_budget.observe_pass(positions, seconds, context)):
                self.executor.prefill([(job.row, job.ready_prompt, job.written, n) for job, n in chunks], width)
        except Exception as exc:
            if len(chunks) > 1:
                log.warning("batched prefill of %d requests failed (%s); retrying them one by one", len(chunks), exc)
                for job, n in chunks:
                    self._run_pass([(job, n)], n)
            else:
                log.exception("prefill failed; ending its request alone")
                self._finish(chunks[0][0], error=exc)
            return
        for job, n in chunks:
            try:
                job.filled = job.written + n
                key, voice, prefix_len = job.voice_key, job.voice, job.ready_prompt.prefix_len
                if job.computes_voice and voice is not None and key is not None and job.filled >= prefix_len:
                    self.voices.publish(key, voice, self.executor.export_prefix(job.row, prefix_len))
                    job.computes_voice = False
                if job.filled >= job.prefill_end:
                    self._start_speaking(job)
            except Exception as exc:
                log.exception("request failed after its prefill; ending it alone")
                self._finish(job, error=exc)

    def _start_speaking(self, job: Job) -> None:
        """The prompt is in: the row's first step input, position and sampling; it joins the step."""
        stream = job.stream
        self.executor.start_row(
            job.row, job.ready_prompt, {**sampling_kwargs(stream.request), "seed": stream.stats.seed, "frame": 0}
        )
        job.state = JobState.SPEAKING

    # -- frame steps ----------------------------------------------------------------------------

    def _runnable(self) -> tuple[list[int], float | None]:
        """Slots to step now, and (if none) how long to sleep before pacing lets one run.

        A row whose queued steps reach its frame limit or the context's end waits for them to be
        read (and ends then): only with overlap is a row still here after its last step."""
        now = time.perf_counter()
        runnable, wait = [], None
        for slot, job in sorted(self.running.items()):
            request = job.stream.request
            if not job.speaking or job.launched >= request.max_frames or self.executor.positions[slot] >= MAX_SEQ_LEN:
                continue
            ahead, first = request.max_ahead_s, job.stream.first_chunk_at
            if ahead is not None and first is not None:
                lead = job.launched * FRAME_MS / 1000 - (now - first) - ahead
                if lead > 0:
                    wait = lead if wait is None else min(wait, lead)
                    continue
            runnable.append(slot)
        return runnable, wait

    def _step(self, slots: list[int]) -> InFlight[Job] | None:
        """Queue one frame for every row in ``slots``; a failure never ends the engine, and ends
        the requests it did not come from only when it cannot be avoided.

        A failure of the model's step is retried once without the newest request (the one whose
        arrival most likely brought it: a new shape, a bad value, the memory it added); only if
        that fails too are the others failed. A failure once the step's codes exist (Mimi's
        decode, the copies out) ends that step's requests: Mimi's streaming state may already have
        moved for their rows, so no retry could give them their audio. (A failure in one row's own
        bookkeeping, when the step is read, ends that request alone: ``_read``.)
        """
        try:
            frame = self._frame(slots)
        except Exception as exc:
            newest = max(slots, key=lambda s: self.running[s].stream.submitted_at)
            log.exception("frame step failed; ending the newest of its %d requests and retrying", len(slots))
            self._finish(self.running[newest], error=exc)
            slots = [s for s in slots if s != newest]
            if not slots:
                return None
            try:
                frame = self._frame(slots)
            except Exception as again:
                log.exception("frame step failed again; ending the %d requests in it", len(slots))
                for slot in slots:
                    self._finish(self.running[slot], error=again)
                return None
        try:
            jobs = [self.running[s] for s in slots]
            step = self.executor.queue(frame, jobs)
        except Exception as exc:
            log.exception("decoding a frame step failed; ending the %d requests in it", len(slots))
            for slot in slots:
                self._finish(self.running[slot], error=exc)
            return None
        for job in jobs:
            job.launched += 1
        return step

    def _frame(self, slots: list[int]) -> Frame:
        return self.executor.frame(slots, max(self.running[s].stream.request.topk for s in slots))

    def _read(self, step: InFlight[Job]) -> None:
        """Wait for a queued step's results and hand each row that is still running its frame."""
        try:
            codes, pcm = step.wait()
        except Exception as exc:  # the device failed the step after it was queued
            log.exception("frame step failed on the device; ending the %d requests in it", len(step.jobs))
            for job in step.jobs:
                if self.running.get(job.row) is job:
                    self._finish(job, error=exc)
            return
        live = [i for i, job in enumerate(step.jobs) if self.running.get(job.row) is job]  # not ended since
        speaking: np.ndarray = np.any(codes, axis=1)  # numpy's stubs type a.any(axis=1) as maybe a scalar
        frames = int(speaking[live].sum())
        now = time.perf_counter()
        self.counts.stepped(now, frames)  # counted before any stream hears of this step's audio
        for i in live:
            job = step.jobs[i]
            try:  # the row's codes and audio are copied out: no stream keeps the step's (pinned) buffers
                self._advance(job, codes[i].copy(), pcm[job.row].copy(), bool(speaking[i]), step.positions[i] + 1, now)
            except Exception as exc:  # this request's own bookkeeping: it alone ends
                log.exception("request failed after its frame step; ending it alone")
                self._finish(job, error=exc)

    def _advance(self, job: Job, codes: np.ndarray, pcm: np.ndarray, speaking: bool, position: int, now: float) -> None:
        """One row's frame: its codes and audio to its stream (which cuts chunks), or its end.
        ``position`` is the row's next position after this frame."""
        if not speaking:
            self._finish(job, reason=StopReason.EOS)
            return
        stream = job.stream
        stream.add_codes(codes)
        stream.stats.invalid_codes += int((codes >= codec.CODEBOOK_SIZE).sum())
        full = stream.stats.frames + 1 >= stream.request.max_frames
        stream.push_frame(pcm, now, last=full or position >= MAX_SEQ_LEN)
        if full:
            self._finish(job, reason=StopReason.MAX_FRAMES)
        elif position >= MAX_SEQ_LEN:
            self._finish(job, reason=StopReason.CONTEXT_FULL)

    def _finish(self, job: Job, reason: StopReason = StopReason.EOS, error: BaseException | None = None) -> None:
        # The stream learns its outcome before the slot is reused, so anyone who sees the slot
        # free also sees the stream's final state. The last chunk goes first: if delivering it
        # fails, nothing is counted yet and the caller ends the request with that error.
        stream = job.stream
        if error is None and reason != StopReason.CANCELLED:
            stream.flush(final=True)
        if error is not None:
            self.counts.ended("failed")
            stream.fail(error)
        else:
            self.counts.ended("cancelled" if reason == StopReason.CANCELLED else "completed")
            stream.end(reason)
        stream.drop_pending()
        job.state = JobState.ENDED
        key = job.voice_key
        if job.computes_voice and key is not None:  # the next request with this voice computes it
            self.voices.release(key)
            job.computes_voice = False
        slot = job.slot
        if slot is not None and self.running.get(slot) is job:
            del self.running[slot]
            self.free.append(slot)
            self.free.sort()
        s = stream.stats
        log.debug(
            "request done: %s, %d frames, queued %.3f s, first audio %s, RTF %s",
            s.stop_reason,
            s.frames,
            s.queued_s or 0.0,
            f"{s.time_to_first_audio_s:.3f} s" if s.time_to_first_audio_s is not None else "n/a",
            f"{s.real_time_factor:.2f}" if s.real_time_factor is not None else "n/a",
        )

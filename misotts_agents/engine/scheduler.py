"""The scheduler thread: continuous batching of every active request, one frame per step.

It alone touches the model, the KV cache and the streaming Mimi state. Each iteration it

1. drops cancelled requests, prefilling or speaking (their slot is free for the next iteration),
2. admits prepared requests into free slots (no model work: a slot is a cache row),
3. runs one bounded prefill pass (prefill.py): the next chunks of several joiners' prompts in one
   batched forward, sized so that the streams already speaking are not stalled; a cached voice
   prefix is copied into the row instead of recomputed; a row whose prompt is in joins the step,
4. queues one batched frame step for every prefilled, unpaced row (step.py: static shapes, a CUDA
   graph on CUDA): backbone decode at per-row positions, the depth decoder for all rows at once,
   then one Mimi decode call for all rows, and the copies of its codes and audio to the host,
5. reads a step's codes and audio and hands each row's audio to its stream in chunks, ending rows
   at end-of-speech or their limit; with watermarking, the chunks handed out in the iteration then
   go to the marker as one batch (marking.py: one marking call per step, on its own thread; the
   loop waits there only while the marker is ``max_backlog`` steps behind).

**Overlap** (on CUDA by default). Nothing in 1-4 waits for the device: a step's inputs for the
next step (its codes, positions, sampling counters) advance on the device and the host right
after it is queued, so step 4 of iteration i+1 is queued *before* the host reads step i's results
in 5, and the host's per-row work (chunking, delivery, end-of-speech) and the next prefill pass
run while the device computes the next step. The host waits once per step, for the oldest step's
copies. On the device, Mimi decodes (and row resets) run on a stream of their own: the next frame
step needs a step's codes, not its audio, so it runs beside that step's decode. The cost is
bookkeeping, not audio: a row that ended in step i has already been queued in step i+1, whose
result for it is dropped (its slot is reused only after, in queue order), and a row's limits
(frames, context) are checked on the host before it is queued. On CPU the device is the host, so
queuing a step runs it; overlapping would only delay each chunk by a step, and the loop reads each
step's results at once (``overlap=True`` runs the CUDA schedule on CPU, for tests).

Prompt preparation (tokenising, Mimi-encoding context audio) happens before, on another thread.
An exception in a step fails the requests of that step, not the engine; one in a prefill pass
fails only the request it belongs to (a failed batched pass is retried row by row).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from misotts_agents.audio import FRAME_MS
from misotts_agents.engine.device import DeviceClock, to_device
from misotts_agents.engine.marking import StepMarker
from misotts_agents.engine.params import sampling_kwargs
from misotts_agents.engine.prefill import (
    Candidate,
    PrefillBudget,
    PrefillChunk,
    context_scale,
    pass_inputs,
    plan_pass,
)
from misotts_agents.engine.prompt import Prompt
from misotts_agents.engine.request import AudioChunk
from misotts_agents.engine.step import FrameStepper, HostRows
from misotts_agents.engine.stream import SpeechStream
from misotts_agents.engine.voice import CachedVoice, VoiceCache
from misotts_agents.errors import EngineClosed
from misotts_agents.model import codec
from misotts_agents.model.config import MAX_SEQ_LEN
from misotts_agents.model.sampling import SamplingState
from misotts_agents.model.transformer import MisoModel, length_bucket

log = logging.getLogger(__name__)

STATS_LOG_INTERVAL_S = 30.0  # while busy, the engine's figures go to the log this often


@dataclass(eq=False)
class Job:
    """A request between preparation and its end (scheduler-internal)."""

    stream: SpeechStream
    client: Hashable | None = None  # whose request it is (fair admission), None: its own
    tenant: Hashable | None = None  # whom that client serves, None: the client alone
    prompt: Prompt | None = None
    voice: CachedVoice | None = None
    slot: int | None = None
    frames: int = 0
    chunk_start: int = 0
    pieces: list[np.ndarray] = field(default_factory=list)
    sizes: Iterator[int] = field(init=False)  # the request's chunk sizes, drawn as its chunks are cut
    want: int = 1
    launched: int = 0  # frame steps queued for it (``frames`` counts those read back)
    first_audio_at: float | None = None
    admitted: int = 0  # admission order (ties in prefill priority)
    filled: int | None = None  # prompt positions in the slot's cache row; None: prefill not started
    computes_voice: bool = False  # this request computes its voice prefix for the voice cache
    prefilled: bool = False  # the whole prompt is in: the row takes part in frame steps

    def __post_init__(self) -> None:
        self.sizes = self.stream.request.chunks.sizes()

    @property
    def ready_prompt(self) -> Prompt:
        """The prompt preparation built: every job the scheduler admits has one."""
        if self.prompt is None:
            raise RuntimeError("the request was not prepared")
        return self.prompt

    @property
    def row(self) -> int:
        """The slot (= KV-cache row) the job was admitted to: every job in ``Scheduler.jobs`` has one."""
        if self.slot is None:
            raise RuntimeError("the request has no slot")
        return self.slot

    @property
    def written(self) -> int:
        """Prompt positions in the row so far (0 before its prefill starts)."""
        return self.filled if self.filled is not None else 0

    @property
    def voice_key(self) -> str | None:
        voice = self.stream.request.voice
        return voice.key if voice is not None else None

    @property
    def prefill_end(self) -> int:
        """Prefill fills every prompt frame but the last; the last is the input of the first frame
        step, so prefill never computes a hidden state nobody needs."""
        return self.ready_prompt.length - 1

    @property
    def prefill_stop(self) -> int:
        """Where the next chunk must stop: the voice prefix's end while it is computed for the cache."""
        return self.ready_prompt.prefix_len if self.computes_voice else self.prefill_end


class _Frame(NamedTuple):
    """A frame step's codes, on the device, before Mimi and the copies are queued."""

    slots: list[int]
    rows: torch.Tensor  # the slots, on the device
    positions: list[int]  # each row's position in the step
    codes: torch.Tensor  # (n, K)


@dataclass(eq=False)
class InFlight:
    """A queued frame step whose codes and audio the host has not read yet."""

    jobs: list[Job]  # its rows' requests, in row order; a row whose job has since ended is dropped
    positions: list[int]  # each row's position in this step
    codes: torch.Tensor  # (n, K), on the host once ``done`` has passed
    pcm: torch.Tensor  # (rows decoded, 1920), likewise
    done: torch.cuda.Event | None  # None when the copies had finished on return (CPU)

    @classmethod
    def copy_out(
        cls,
        jobs: list[Job],
        positions: list[int],
        codes: torch.Tensor,
        pcm: torch.Tensor,
        stream: torch.cuda.Stream | None,
    ) -> InFlight:
        """Queue the copies of a step's results to the host, on CUDA on Mimi's ``stream`` (behind
        the decode; the codes were final before it), into pinned memory (a copy into pageable
        memory would wait), marked done by an event; on CPU (``stream`` None) they are the host's."""
        if stream is None:
            return cls(jobs, positions, codes, pcm, None)
        codes.record_stream(stream)  # made on the step's stream, read on this one
        with torch.cuda.stream(stream):
            host_codes = torch.empty(codes.shape, dtype=codes.dtype, pin_memory=True).copy_(codes, non_blocking=True)
            host_pcm = torch.empty(pcm.shape, dtype=pcm.dtype, pin_memory=True).copy_(pcm, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return cls(jobs, positions, host_codes, host_pcm, done)

    def wait(self) -> tuple[np.ndarray, np.ndarray]:
        """The step's codes and audio, once the device has produced and copied them."""
        if self.done is not None:
            self.done.synchronize()
        return self.codes.numpy(), self.pcm.numpy()


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
        prefill_chunk: PrefillChunk = "auto",
        overlap: bool | None = None,
        marker: StepMarker | None = None,
    ):
        """``model`` must have KV caches for ``max_batch`` rows: slot i is cache row i (step.py).

        ``prefill_chunk`` bounds each prefill pass while others speak (prefill.py): "auto", a number
        of positions, or 0 / None for whole prompts. ``overlap`` (default: on CUDA) queues each
        step before reading the one before (module docstring). ``marker`` (marking.py) is told when
        each iteration's chunks are out, so it marks them together.
        """
        self.model = model
        self.decoder = decoder
        self.marker = marker
        # On CUDA, Mimi decodes (and resets) on a stream of its own: a step's decode runs beside the
        # next frame step, which needs only the step's codes, not its audio.
        # (high priority: its own pool of streams, so never one of those other threads draw from)
        self.mimi_stream = torch.cuda.Stream(model.device, priority=-1) if model.device.type == "cuda" else None
        if self.mimi_stream is not None:
            self.mimi_stream.wait_stream(torch.cuda.current_stream(model.device))  # the decoder's fresh state
            with torch.cuda.stream(self.mimi_stream), torch.inference_mode():
                decoder.warm_up()  # its CUDA graphs, captured now rather than in a request's step
            self.mimi_stream.synchronize()
        self.voices = voices
        self.max_batch = max_batch
        self.device = model.device
        k = model.num_codebooks
        self.k = k
        dev = self.device
        self.overlap = dev.type == "cuda" if overlap is None else overlap  # may be switched at any time
        self.clock = DeviceClock(dev)
        self.in_flight: InFlight | None = None  # the step queued last, while overlapping
        self.stepper = FrameStepper(model, max_batch, cuda_graphs=cuda_graphs, compile=compile, buckets=batch_buckets)
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
        self.prefill_budget = PrefillBudget(prefill_chunk, context_scale(model.config.backbone))
        self._admissions = 0
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
                self.clock.collect()
                self._drop_cancelled()
                self._admit()
                self._prefill()
                runnable, wait = self._runnable()
                try:
                    idle = self._step_and_read(runnable)
                except Exception as exc:  # a failure outside what _step and _read isolate: never the engine
                    self.in_flight = None  # a step's results may be lost: no row in a step may go on
                    speaking = [job for job in self.jobs.values() if job.prefilled]
                    log.exception("frame step failed; ending the %d requests speaking", len(speaking))
                    for job in speaking:
                        self._finish(job, error=exc)
                    idle = False
                if self.marker is not None:  # this iteration's chunks (its step's) are out: mark them together
                    self.marker.end_step()
                if idle:
                    self.wake.wait(timeout=wait)
            self._shutdown()

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
        return queued is None and previous is None and all(job.prefilled for job in self.jobs.values())

    def _shutdown(self) -> None:
        self.in_flight = None  # its rows end below; their results are not wanted
        if self.mimi_stream is not None:
            try:  # the decoder's state is released after this returns
                self.mimi_stream.synchronize()
            except Exception:  # a failed device: the requests below must still end
                log.exception("waiting for Mimi's stream at shutdown failed")
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
        """Give every prepared request a free slot (its cache row); prefill happens in passes."""
        while self.free:
            with self._lock:
                if not self.ready:
                    return
                job = self.ready.popleft()
            if job.stream.cancelled.is_set():  # cancelled since the last sweep (maybe unprepared)
                self._count("cancelled")
                job.stream.end("cancelled")
                continue
            job.slot = self.free.pop(0)
            job.admitted = self._admissions
            self._admissions += 1
            job.stream.stats.queued_s = time.perf_counter() - job.stream.submitted_at
            self.jobs[job.slot] = job
            job.stream.admit()

    def _prefill(self) -> None:
        """One bounded prefill pass over the rows still prefilling (see prefill.py for the policy)."""
        joining = sorted((j for j in self.jobs.values() if not j.prefilled), key=lambda j: j.admitted)
        if not joining:
            return
        speaking = len(joining) < len(self.jobs)
        if self.prefill_budget.whole_prompts:  # the schedule before chunking, kept for comparison
            for job in joining:
                while self._startable(job) and not job.prefilled and job in self.jobs.values():
                    self._run_pass([(job, job.prefill_stop - job.written)], job.prefill_stop - job.written)
                if speaking and (job.prefilled or job not in self.jobs.values()):
                    return  # one whole prefill per iteration while others speak
            return
        candidates = [
            Candidate(job, job.written, job.prefill_stop, job.prefill_end - job.written, job.admitted)
            for job in joining
            if self._startable(job) and not job.prefilled
        ]
        filled = max((c.filled for c in candidates), default=0)
        plan, width = plan_pass(candidates, self.prefill_budget.positions(speaking, filled), MAX_SEQ_LEN)
        if plan:
            self._run_pass([(c.key, n) for c, n in plan], width)

    def _startable(self, job: Job) -> bool:
        """Start the job's prefill if it has not started: copy its voice's cached prefix, or take on
        computing it. False while another request computes the same voice (it waits for the copy)."""
        if job.filled is not None:
            return True
        voice = job.voice
        try:
            if voice is not None and voice.kv is None:
                voice.kv = self._voice_kv(job)
            if voice is not None and voice.kv is not None:
                self.model.backbone.import_prefix(job.row, voice.kv)
                job.filled = job.ready_prompt.prefix_len
            elif voice is not None:
                if any(o.computes_voice and o.voice_key == job.voice_key for o in self.jobs.values()):
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

    def _voice_kv(self, job: Job) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The voice's prefix KV if known under its key: preparation threads may each have made their
        own entry for the same new voice, and only one request computes it."""
        key = job.voice_key
        cached = self.voices.get(key) if key is not None else None
        if cached is not None and cached.kv is not None:
            return cached.kv
        return next(
            (
                o.voice.kv
                for o in self.jobs.values()
                if o.voice is not None and o.voice.kv is not None and o.voice_key == key
            ),
            None,
        )

    def _run_pass(self, chunks: list[tuple[Job, int]], width: int) -> None:
        """One batched forward of each job's next ``n`` positions; a failure ends only its request:
        a failed batched pass is retried row by row (the KV it wrote lies beyond what is filled)."""
        try:
            tokens, mask, pos = pass_inputs(
                [(job.ready_prompt.tokens, job.ready_prompt.mask, job.written, n) for job, n in chunks],
                width,
                self.device,
            )
            rows = to_device([job.row for job, _ in chunks], self.device)
            # the window, from the host's positions (reading the device's would wait for it)
            length = length_bucket(max(job.written for job, _ in chunks) + width, self.model.backbone.max_len)
            context = sum(job.written for job, _ in chunks) / len(chunks) + width / 2
            positions = len(chunks) * width
            with self.clock.measure(lambda seconds: self.prefill_budget.observe_pass(positions, seconds, context)):
                self.model.backbone_last_hidden(tokens, mask, pos, rows, length)
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
                prefix_len = job.ready_prompt.prefix_len
                if job.computes_voice and job.voice is not None and job.filled >= prefix_len:
                    job.voice.kv = self.model.backbone.export_prefix(job.row, prefix_len)
                    job.computes_voice = False
                    key = job.voice_key
                    cached = self.voices.get(key) if key is not None else None
                    if cached is not None and cached.kv is None:  # the cache may hold another entry for it
                        cached.kv = job.voice.kv
                if job.filled >= job.prefill_end:
                    self._start_speaking(job)
            except Exception as exc:
                log.exception("request failed after its prefill; ending it alone")
                self._finish(job, error=exc)

    def _start_speaking(self, job: Job) -> None:
        """The prompt is in: set the row's first step input, position and sampling; it joins the step."""
        stream, prompt, slot, end = job.stream, job.ready_prompt, job.row, job.prefill_end
        request = stream.request
        self.next_tokens[slot] = to_device(prompt.tokens[end:], self.device)
        self.next_mask[slot] = to_device(prompt.mask[end:], self.device)
        self.positions[slot] = end
        self.sampling.set_row(slot, **{**sampling_kwargs(request), "seed": stream.stats.seed, "frame": 0})
        with self._on_mimi_stream():  # behind the slot's last occupant's decodes, before its own
            self.decoder.reset([slot])
        job.want = next(job.sizes)
        job.prefilled = True

    def _runnable(self) -> tuple[list[int], float | None]:
        """Slots to step now, and (if none) how long to sleep before pacing lets one run.

        A row whose queued steps reach its frame limit or the context's end waits for them to be
        read (and ends then): only with overlap is a row still here after its last step."""
        now = time.perf_counter()
        runnable, wait = [], None
        for slot, job in sorted(self.jobs.items()):
            request = job.stream.request
            if not job.prefilled or job.launched >= request.max_frames or self.positions[slot] >= MAX_SEQ_LEN:
                continue
            ahead = request.max_ahead_s
            if ahead is not None and job.first_audio_at is not None:
                lead = job.launched * FRAME_MS / 1000 - (now - job.first_audio_at) - ahead
                if lead > 0:
                    wait = lead if wait is None else min(wait, lead)
                    continue
            runnable.append(slot)
        return runnable, wait

    def _step(self, slots: list[int]) -> InFlight | None:
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
            newest = max(slots, key=lambda s: self.jobs[s].stream.submitted_at)
            log.exception("frame step failed; ending the newest of its %d requests and retrying", len(slots))
            self._finish(self.jobs[newest], error=exc)
            slots = [s for s in slots if s != newest]
            if not slots:
                return None
            try:
                frame = self._frame(slots)
            except Exception as again:
                log.exception("frame step failed again; ending the %d requests in it", len(slots))
                for slot in slots:
                    self._finish(self.jobs[slot], error=again)
                return None
        try:
            return self._queue(frame)
        except Exception as exc:
            log.exception("decoding a frame step failed; ending the %d requests in it", len(slots))
            for slot in slots:
                self._finish(self.jobs[slot], error=exc)
            return None

    def _frame(self, slots: list[int]) -> _Frame:
        """The model's frame step for ``slots``: codes (n, K) on the device, queued.

        It changes no state (positions, inputs and sampling counters advance in ``_queue``), so it
        can be run again with fewer rows: the KV entries it wrote are rewritten at the same
        positions, and the keyed sampling draws the same codes again.
        """
        rows = to_device(slots, self.device)
        positions = [self.positions[s] for s in slots]
        pos = to_device(positions, self.device).unsqueeze(1)
        sampling = self.sampling.select(rows)
        # the host's copy of rows, positions and top-k: the step picks its shape without reading the device
        host = HostRows(slots, positions, max(self.jobs[s].stream.request.topk for s in slots))
        codes = self.stepper(rows, self.next_tokens[rows], self.next_mask[rows], pos, sampling, host)
        return _Frame(slots, rows, positions, codes)

    def _queue(self, frame: _Frame) -> InFlight:
        """Queue the step's Mimi decode and the copies of its results, then move its rows on to
        their next step's inputs (on the device, from the codes not yet read), so the next step
        can be queued before this one is read."""
        slots, rows, codes = frame.slots, frame.rows, frame.codes
        pcm = self._decode(rows, codes, max(slots))
        jobs = [self.jobs[s] for s in slots]
        step = InFlight.copy_out(jobs, frame.positions, codes, pcm, self.mimi_stream)
        self.next_tokens[rows, 0, : self.k] = codes
        self.next_mask[rows] = self.audio_mask
        self.sampling.advance(rows)
        for s, job in zip(slots, jobs, strict=True):
            self.positions[s] += 1
            job.launched += 1
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

    def _on_mimi_stream(self) -> contextlib.AbstractContextManager[object]:
        return torch.cuda.stream(self.mimi_stream) if self.mimi_stream is not None else contextlib.nullcontext()

    def _read(self, step: InFlight) -> None:
        """Wait for a queued step's results and hand each row that is still running its frame."""
        try:
            codes, pcm = step.wait()
        except Exception as exc:  # the device failed the step after it was queued
            log.exception("frame step failed on the device; ending the %d requests in it", len(step.jobs))
            for job in step.jobs:
                if self.jobs.get(job.row) is job:
                    self._finish(job, error=exc)
            return
        live = [i for i, job in enumerate(step.jobs) if self.jobs.get(job.row) is job]  # not ended since
        speaking: np.ndarray = np.any(codes, axis=1)  # numpy's stubs type a.any(axis=1) as maybe a scalar
        frames = int(speaking[live].sum())
        now = time.perf_counter()
        with self._lock:  # counted before any stream hears of this step's audio
            self.steps += 1
            self.total_frames += frames
            self._step_times.append((now, frames))
        for i in live:
            job = step.jobs[i]
            try:  # the row's codes and audio are copied out: no stream keeps the step's (pinned) buffers
                self._advance(job, codes[i].copy(), pcm[job.row].copy(), bool(speaking[i]), step.positions[i] + 1, now)
            except Exception as exc:  # this request's own bookkeeping: it alone ends
                log.exception("request failed after its frame step; ending it alone")
                self._finish(job, error=exc)

    def _advance(self, job: Job, codes: np.ndarray, pcm: np.ndarray, speaking: bool, position: int, now: float) -> None:
        """One row's frame: its codes and audio to its stream, a chunk when one is due, or its end.
        ``position`` is the row's next position after this frame."""
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
        elif position >= MAX_SEQ_LEN:
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

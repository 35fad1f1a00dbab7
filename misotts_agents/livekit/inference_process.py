"""One engine for every job of a process-per-job LiveKit worker: the worker's inference process.

LiveKit's default worker runs each job in its own process; loading the model there would load it
once per job (and per idle process). Instead :func:`register_inference_runner` registers
:class:`MisoInferenceRunner` with LiveKit's (private) ``_InferenceRunner`` API: the worker starts
one supervised ``agents_inference_process`` that loads the engine once, and every job reaches it
through ``ctx.inference_executor.do_inference(method, bytes)``.

That IPC is unary (bytes in, bytes out) and the inference process handles requests one at a time,
so ``run`` never blocks on generation: ``start`` submits a request to the engine (whose scheduler
batches every job's requests), ``poll`` returns the audio generated since the last poll, ``cancel``
drops the request at the engine's next frame step. The job side (:class:`InferenceEngine`) polls
every ``poll_interval`` seconds while it waits, so streaming is kept, with up to one poll interval
(plus ~1 ms of IPC) added per chunk. Context audio is sent once per job and cached by hash in the
runner. Requests nobody polls for ``stale_s`` (a job that died) are cancelled.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from cachetools import LRUCache
from livekit.agents.inference_runner import _InferenceRunner

from misotts_agents import errors
from misotts_agents.audio import SAMPLE_RATE, from_int16, to_int16, to_mono
from misotts_agents.engine.audio_stream import Admission
from misotts_agents.engine.request import AudioChunk, Segment, StopReason, StreamStats, SynthesisRequest
from misotts_agents.engine.voice import VoicePrompt
from misotts_agents.engine.words import WordTiming
from misotts_agents.model.sources import DEFAULT_MODEL

if TYPE_CHECKING:
    from misotts_agents.engine.stream import SpeechStream

log = logging.getLogger("misotts_agents.livekit")

INFERENCE_METHOD = "misotts_tts"
OPTIONS_ENV = "MISOTTS_INFERENCE_OPTIONS"
_HEADER = struct.Struct(">I")


def pack(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return _HEADER.pack(len(head)) + head + payload


def unpack(data: bytes) -> tuple[dict[str, Any], memoryview]:
    view = memoryview(data)
    (size,) = _HEADER.unpack_from(view)
    return json.loads(bytes(view[4 : 4 + size])), view[4 + size :]


def _error(exc: BaseException) -> dict[str, str]:
    code, message, _ = errors.to_wire(exc)
    return {"code": code, "message": message}


def _raise(err: dict[str, str]) -> None:
    raise errors.from_wire(err.get("code", "internal"), err.get("message", ""))


# -- the inference process side ---------------------------------------------------------------


@dataclass
class _Active:
    stream: SpeechStream
    items: deque[AudioChunk] = field(default_factory=deque)
    error: BaseException | None = None
    done: bool = False
    last_seen: float = field(default_factory=time.monotonic)


class MisoInferenceRunner(_InferenceRunner):
    """Holds the engine in the worker's inference process. Instantiated there with no arguments;
    the model and load options come from :data:`OPTIONS_ENV` (set by :func:`register_inference_runner`).
    Tests pass ``engine=`` directly."""

    INFERENCE_METHOD = INFERENCE_METHOD

    def __init__(self, engine: Any = None, *, stale_s: float = 30.0, max_cached_s: float = 600.0) -> None:
        self.engine = engine
        self.stale_s = stale_s
        self.max_cached_samples = int(max_cached_s * SAMPLE_RATE)
        self._load_error: BaseException | None = None
        self._active: dict[str, _Active] = {}
        self._cancelled: deque[str] = deque(maxlen=1024)
        # Context audio by hash, least recently used out first beyond max_cached_s of audio in all.
        self._blobs: LRUCache[str, np.ndarray] = LRUCache(self.max_cached_samples, getsizeof=lambda a: a.size)
        self._voices: LRUCache[str, VoicePrompt] = LRUCache(64)
        self._lock = threading.Lock()

    def initialize(self) -> None:
        if self.engine is not None:
            return
        from misotts_agents.engine.registry import shared_engine

        options = json.loads(os.environ.get(OPTIONS_ENV, "{}"))
        model = options.pop("model", DEFAULT_MODEL)
        try:
            self.engine = shared_engine(model, **options)
        except BaseException as exc:  # reported to every request instead of failing the worker
            self._load_error = exc
            raise

    def run(self, data: bytes) -> bytes | None:
        header, payload = unpack(data)
        op = header.get("op")
        try:
            self._reap()
            if op == "poll":
                return self._poll(header["id"])
            if op == "start":
                return self._start(header, payload)
            if op == "cancel":
                self._cancel(header["id"])
                return pack({})
            if op == "stats":
                return pack({"stats": self._engine().metrics().__dict__})
            raise errors.InvalidRequest(f"unknown operation {op!r}")
        except errors.MisoError as exc:
            return pack({"error": _error(exc)})

    def _engine(self) -> Any:
        if self.engine is None:
            reason = f": {self._load_error}" if self._load_error else ""
            raise errors.ModelSourceError(f"the inference process has no MisoTTS engine{reason}")
        return self.engine

    def _blob(self, key: str, audio: np.ndarray | None) -> np.ndarray | None:
        with self._lock:
            if audio is None:
                return self._blobs.get(key)
            if audio.size <= self._blobs.maxsize:  # a larger clip is used once, not kept
                self._blobs[key] = audio
            return audio

    def _start(self, header: dict[str, Any], payload: memoryview) -> bytes:
        engine = self._engine()
        offset, missing, audios = 0, [], []
        for part in [*header["segments"], *([header["voice"]] if header.get("voice") else [])]:
            inline = None
            if part.get("inline"):
                nbytes = 2 * part["samples"]
                inline = from_int16(payload[offset : offset + nbytes])
                offset += nbytes
            audio = self._blob(part["hash"], inline)
            if audio is None:
                missing.append(part["hash"])
            audios.append(audio)
        if missing:
            return pack({"missing": missing})
        segments = [
            Segment(s["speaker"], s["text"], audio, SAMPLE_RATE)
            for s, audio in zip(header["segments"], audios, strict=False)
        ]
        voice = None
        if header.get("voice"):
            v = header["voice"]
            voice = self._voices.get(v["hash"])
            if voice is None:
                voice = VoicePrompt(v["speaker"], v["text"], audios[-1], SAMPLE_RATE)
                self._voices[v["hash"]] = voice
        request = SynthesisRequest(**header["request"], context=tuple(segments), voice=voice)
        rid = header["id"]
        if rid in self._cancelled:
            return pack({"id": rid})
        active = _Active(engine.stream(request, client=header.get("client")))
        with self._lock:
            self._active[rid] = active
        threading.Thread(target=self._consume, args=(active,), name=f"misotts-runner-{rid[:8]}", daemon=True).start()
        return pack({"id": rid})

    @staticmethod
    def _consume(active: _Active) -> None:
        # Iterating in a thread of its own also applies the watermark here, off the IPC loop.
        try:
            for chunk in active.stream:
                active.items.append(chunk)
        except BaseException as exc:
            active.error = exc
        finally:
            active.done = True

    def _poll(self, rid: str) -> bytes:
        with self._lock:
            active = self._active.get(rid)
        if active is None:
            return pack({"done": True, "chunks": [], "cancelled": rid in self._cancelled})
        active.last_seen = time.monotonic()
        done = active.done  # read before draining, so no chunk is left behind
        chunks, pieces = [], []
        while active.items:
            chunk = active.items.popleft()
            chunks.append({"samples": chunk.pcm.size, "start_frame": chunk.start_frame, "frames": chunk.frames})
            chunks[-1]["final"] = chunk.final
            chunks[-1]["words"] = [[w.word, w.start_s, w.end_s] for w in chunk.words]
            pieces.append(to_int16(chunk.pcm))
        reply: dict[str, Any] = {"done": done, "chunks": chunks, "queued": active.stream.queued}
        if done:
            reply["stats"] = asdict(active.stream.stats)
            if active.error is not None:
                reply["error"] = _error(active.error)
            with self._lock:
                self._active.pop(rid, None)
        return pack(reply, b"".join(pieces))

    def _cancel(self, rid: str) -> None:
        self._cancelled.append(rid)
        with self._lock:
            active = self._active.pop(rid, None)
        if active is not None:
            active.stream.cancel()

    def _reap(self) -> None:
        now = time.monotonic()
        with self._lock:
            stale = [rid for rid, a in self._active.items() if now - a.last_seen > self.stale_s]
        for rid in stale:
            log.warning("cancelling MisoTTS request %s: not polled for %.0f s (its job is gone?)", rid, self.stale_s)
            self._cancel(rid)


def register_inference_runner(model: str = DEFAULT_MODEL, **load_options: Any) -> None:
    """Register the runner so the worker's inference process loads ``model`` once for every job.

    Call it on the main thread before the worker starts (at import of your agent file). The
    options go to ``MisoEngine.load`` through an environment variable, so they must be JSON values
    (``device="cuda"``, ``watermark=True``, ``max_batch=8``...).
    """
    os.environ[OPTIONS_ENV] = json.dumps({"model": str(model), **load_options})
    if _InferenceRunner.registered_runners.get(INFERENCE_METHOD) is not MisoInferenceRunner:
        _InferenceRunner.register_runner(MisoInferenceRunner)


# -- the job side -------------------------------------------------------------------------------


class InferenceEngine:
    """The job's handle on the engine in the worker's inference process; pass it as ``TTS(engine=...)``.

    ``executor`` defaults to the current job's ``ctx.inference_executor`` (looked up on first use).
    """

    def __init__(self, executor: Any = None, *, poll_interval: float = 0.02) -> None:
        self._executor = executor
        self.poll_interval = poll_interval
        self._sent: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.key = uuid.uuid4().hex  # this job's key in the inference process's fair admission

    @property
    def executor(self) -> Any:
        if self._executor is None:
            from livekit.agents import get_job_context

            self._executor = get_job_context().inference_executor
        return self._executor

    async def call(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], memoryview]:
        try:
            data = await self.executor.do_inference(INFERENCE_METHOD, pack(header, payload))
        except (RuntimeError, NotImplementedError) as exc:  # no runner, runner crashed, no executor
            raise ConnectionError(f"MisoTTS inference process unavailable: {exc}") from exc
        if data is None:
            raise ConnectionError("MisoTTS inference process returned nothing")
        reply, rest = unpack(data)
        if "error" in reply:
            _raise(reply["error"])
        return reply, rest

    def stream(self, request: SynthesisRequest, *, client: Hashable | None = None) -> InferenceProcessStream:
        """A stream for ``request``. The inference process takes its requests in turn with other
        jobs' by this job (its engine instance), so ``client`` adds nothing here."""
        return InferenceProcessStream(self, request)

    async def stats(self) -> dict[str, Any]:
        reply, _ = await self.call({"op": "stats"})
        return reply["stats"]

    def _spawn(self, coro: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _describe(seg_speaker: int, text: str, audio: np.ndarray) -> tuple[dict[str, Any], bytes]:
    pcm = to_int16(audio)
    key = hashlib.sha1(pcm).hexdigest()
    return {"speaker": seg_speaker, "text": text, "hash": key, "samples": len(pcm) // 2}, pcm


class InferenceProcessStream:
    """Async iterator of :class:`AudioChunk` for one request run in the inference process (an
    :class:`~misotts_agents.engine.audio_stream.AudioStream`); its admission is read from the polls,
    so it is settled while the stream is iterated."""

    def __init__(self, engine: InferenceEngine, request: SynthesisRequest) -> None:
        self._engine = engine
        self._request = request
        self.id = uuid.uuid4().hex
        self._started = False
        self._done = False
        self._cancelled = False
        self._buffer: deque[AudioChunk] = deque()
        self.stats = StreamStats(seed=request.seed or 0)  # as the inference process reports it at the end
        self.queued = False  # waiting for an engine slot, as of the last poll
        self._admission = Admission()

    async def _start(self) -> None:
        r = self._request
        # The runner takes 24 kHz mono (the wire carries no rate); a voice prompt is converted already.
        parts = [
            _describe(s.speaker, s.text, to_mono(s.audio, s.sample_rate, f"context[{i}] audio"))
            for i, s in enumerate(r.context)
        ]
        voice = None
        if r.voice is not None:  # converted when the prompt was made: asarray only types it as an array
            voice = _describe(r.voice.speaker, r.voice.text, np.asarray(r.voice.audio))
        fields = {
            "text": r.text,
            "speaker": r.speaker,
            "temperature": r.temperature,
            "topk": r.topk,
            "seed": r.seed,
            "max_audio_ms": r.max_audio_ms,
            "watermark": r.watermark,
            "max_ahead_s": r.max_ahead_s,
        }
        every = [*parts, *([voice] if voice else [])]
        resend = False
        while True:
            payload = []
            for desc, pcm in every:
                desc["inline"] = resend or desc["hash"] not in self._engine._sent
                if desc["inline"]:
                    payload.append(pcm)
            header = {
                "op": "start",
                "id": self.id,
                "client": self._engine.key,
                "request": fields,
                "segments": [d for d, _ in parts],
                "voice": voice[0] if voice else None,
            }
            reply, _ = await self._engine.call(header, b"".join(payload))
            self._engine._sent.update(d["hash"] for d, _ in every)
            if "missing" not in reply or resend:
                break
            resend = True  # the runner evicted (or never had) some audio: send it all again
        self._started = True

    async def _poll(self) -> None:
        reply, payload = await self._engine.call({"op": "poll", "id": self.id})
        offset = 0
        for c in reply["chunks"]:
            nbytes = 2 * c["samples"]
            pcm = from_int16(payload[offset : offset + nbytes])
            offset += nbytes
            words = tuple(WordTiming(w, a, b) for w, a, b in c.get("words", ()))
            self._buffer.append(AudioChunk(pcm, c["start_frame"], c["frames"], c["final"], words=words))
        self.queued = bool(reply.get("queued")) and not reply["done"]
        if self._buffer or not (self.queued or reply["done"]):
            self._admission.settle(True)
        if reply["done"]:
            self._done = True
            self._admission.settle(False)
            if "stats" in reply:
                self.stats = StreamStats(**reply["stats"])
            if "error" in reply:
                _raise(reply["error"])

    async def wait_admitted(self) -> bool:
        return await self._admission.wait()

    def __aiter__(self) -> InferenceProcessStream:
        return self

    async def __anext__(self) -> AudioChunk:
        if self._cancelled:
            raise StopAsyncIteration
        try:
            if not self._started:
                await self._start()
            while not self._buffer:
                if self._done:
                    raise StopAsyncIteration
                await self._poll()
                if not self._buffer and not self._done:
                    await asyncio.sleep(self._engine.poll_interval)
            return self._buffer.popleft()
        except asyncio.CancelledError:
            self.cancel()
            raise
        except Exception:  # the end, or a failed start or poll: no slot now if none before
            self._admission.settle(False)
            raise

    def cancel(self) -> None:
        """Stop the request (fire-and-forget over the IPC); safe to call more than once."""
        self._admission.settle(False)
        if self._cancelled or self._done:
            return
        self._cancelled = True
        self.stats.stop_reason = StopReason.CANCELLED
        self._engine._spawn(self._engine.call({"op": "cancel", "id": self.id}))

    close = cancel

    async def aclose(self) -> None:
        self.cancel()

"""One attempt of a LiveKit TTS stream: its sentences spoken one after another into LiveKit's emitter.

Each sentence is one engine request; its chunks are pushed while they are generated, each word as a
``TimedString`` placed where its audio plays, and the sentence's audio is kept as context for the
next ones of the segment. A sentence longer than :data:`SPLIT_SHARE` of ``max_audio_ms`` (at a
typical speaking rate) is split at clauses first, so the per-request cap does not cut it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import numpy as np
from livekit.agents import APIConnectOptions, APITimeoutError, tts
from livekit.agents.types import TimedString

from misotts_agents.audio import SAMPLE_RATE
from misotts_agents.engine.audio_stream import AudioSource, AudioStream, first_chunk
from misotts_agents.engine.request import AudioChunk, Segment, SynthesisRequest
from misotts_agents.engine.words import split_for_length, words_of
from misotts_agents.livekit.errors import map_error
from misotts_agents.livekit.tone import SpokenSegment, current_tracker

if TYPE_CHECKING:
    from misotts_agents.livekit.tts import TTS

log = logging.getLogger("misotts_agents.livekit")

# A sentence is split (at clauses) when it would take more than this share of max_audio_ms at a
# typical speaking rate: real speech varies, and the cap must not be what ends it.
SPLIT_SHARE = 0.5
# Earlier sentences of the segment kept as the agent's context for the next sentence.
SEGMENT_CONTEXT_SENTENCES = 2


class Speaker:
    """Speaks sentences one after another into one emitter: one stream attempt's state, made afresh
    for every attempt (a retry is conditioned on nothing the failed attempt produced)."""

    def __init__(self, owner: TTS, conn_options: APIConnectOptions) -> None:
        self._tts = owner
        self._timeout = conn_options.timeout
        self._tracker = current_tracker()  # the session's, when its agent has MisoToneMixin
        self._memory = owner.memory  # the TTS's own, else the session's when tone conditioning is on
        if self._memory is None and self._tracker is not None and owner._opts.tone_conditioning:
            self._memory = self._tracker.memory
        self._segment: SpokenSegment | None = self._tracker.begin_segment() if self._tracker is not None else None
        self._earlier: list[Segment] = []
        self._pushed_s = 0.0  # audio pushed so far: where the next request's words start
        self._words = 0  # words pushed so far (the first goes without a leading space)

    def abandon(self) -> None:
        """The attempt failed. Without audio it never plays: the tracker forgets it (the retry's
        segment takes its place); audio it did push plays, so its record stays."""
        if self._segment is not None and self._tracker is not None and not self._segment.seconds:
            self._tracker.discard(self._segment)

    async def speak(self, text: str, emitter: tts.AudioEmitter) -> None:
        text = text.strip()
        if not text:
            return
        engine = await self._tts._get_engine()
        max_s = self._tts._opts.max_audio_ms / 1000 * SPLIT_SHARE
        for part in split_for_length(text, max_s):
            await self._request(engine, part, emitter)

    def _engine_request(self, text: str) -> SynthesisRequest:
        """The request for ``text`` with the TTS's options now, conditioned on the conversation's tone
        and the segment's last sentences."""
        opts = self._tts._opts
        reply = self._earlier[-SEGMENT_CONTEXT_SENTENCES:]
        if self._memory is None or not opts.tone_conditioning:
            return opts.request(text, opts.voice, tuple(reply))
        return opts.request(text, opts.voice or self._memory.voice, self._memory.reply_context(reply=reply))

    async def _request(self, engine: AudioSource, text: str, emitter: tts.AudioEmitter) -> None:
        if self._earlier:  # release the last sentence's held-back tail while this one is prefilled
            emitter.flush()
        try:
            request = self._engine_request(text)
            stream = engine.stream(request, client=self._tts)  # this session's turn in fair admission
        except Exception as exc:
            raise map_error(exc) from exc
        if self._segment is not None:
            self._segment.sentence(text)
        pieces: list[np.ndarray] = []
        spoken: list[str] = []
        last: AudioChunk | None = None
        try:
            async for chunk in _chunks(stream, self._timeout):
                if chunk.pcm.size:
                    emitter.push(chunk.to_int16())
                    pieces.append(chunk.pcm)
                for w in chunk.words:
                    start, end = self._pushed_s + w.start_s, self._pushed_s + w.end_s
                    emitter.push_timed_transcript(
                        TimedString(w.word if not self._words else f" {w.word}", start_time=start, end_time=end)
                    )
                    self._words += 1
                    spoken.append(w.word)
                if self._segment is not None:
                    self._segment.audio(chunk.pcm, chunk.words)
                last = chunk
        finally:
            stream.cancel()  # no-op when it ended by itself; frees the slot on cancel/errors
        if last is not None and last.final and last.start_frame + last.frames >= request.max_frames:
            rest = " ".join(words_of(text)[len(spoken) :])
            log.warning(
                "MisoTTS: max_audio_ms=%s cut a sentence short even after splitting it: %s",
                self._tts._opts.max_audio_ms,
                f"not spoken: {rest!r}" if rest else f"the end of {text!r} may be clipped",
            )
        if pieces:
            audio = np.concatenate(pieces)
            self._pushed_s += audio.size / SAMPLE_RATE
            heard = " ".join(spoken) if spoken else text  # the words its audio holds
            self._earlier.append(Segment(self._tts._opts.speaker, heard, audio, SAMPLE_RATE))


async def _chunks(stream: AudioStream, timeout: float) -> AsyncIterator[AudioChunk]:
    """The stream's chunks; ``timeout`` bounds the wait for each, counted for the first one from when
    the request leaves the engine's queue (a busy engine delays it; it has not failed)."""
    iterator = stream.__aiter__()
    first = True
    while True:
        try:
            if first:
                chunk = await first_chunk(stream, iterator, timeout)
                first = False
            else:
                chunk = await asyncio.wait_for(iterator.__anext__(), timeout)
        except StopAsyncIteration:
            return
        except TimeoutError as exc:
            raise APITimeoutError(f"MisoTTS produced no audio for {timeout} s") from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise map_error(exc) from exc
        yield chunk


@contextlib.contextmanager
def attempt(owner: TTS, conn_options: APIConnectOptions) -> Iterator[Speaker]:
    speaker = Speaker(owner, conn_options)
    try:
        yield speaker
    except Exception:  # (a cancel, an interruption, keeps the record: what played is reported)
        speaker.abandon()
        raise

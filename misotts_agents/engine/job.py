"""A request inside the engine, from submission to its end, and the state it is in."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from enum import Enum

from misotts_agents.engine.prompt import Prompt
from misotts_agents.engine.stream import SpeechStream
from misotts_agents.engine.voice import CachedVoice


class JobState(Enum):
    """Where a request is. Preparation and the wait for a slot come first; a slot's row is then
    prefilled in passes, then steps frame by frame until it ends."""

    PREPARING = "preparing"  # tokenising, Mimi-encoding its context (preparation threads)
    WAITING = "waiting"  # prepared, waiting for a free slot (admission.py)
    PREFILLING = "prefilling"  # in a slot, its prompt going into the slot's cache row
    SPEAKING = "speaking"  # in the frame steps
    ENDED = "ended"


@dataclass(eq=False)
class Job:
    """A request between submission and its end (scheduler-internal)."""

    stream: SpeechStream
    client: Hashable | None = None  # whose request it is (fair admission), None: its own
    tenant: Hashable | None = None  # whom that client serves, None: the client alone
    state: JobState = JobState.PREPARING
    prompt: Prompt | None = None
    voice: CachedVoice | None = None
    slot: int | None = None
    launched: int = 0  # frame steps queued for it (``stream.stats.frames`` counts those read back)
    admitted: int = 0  # admission order (ties in prefill priority)
    filled: int | None = None  # prompt positions in the slot's cache row; None: prefill not started
    computes_voice: bool = False  # this request computes its voice prefix for the voice cache

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

    @property
    def speaking(self) -> bool:
        return self.state is JobState.SPEAKING

"""Voice prompts and the cache of their prefill.

A voice prompt (a ~10 s clip of the target voice and its transcript) sits at the start of every
prompt that uses it. Its backbone KV entries depend only on itself, so they are computed once per
voice and copied into each new request's cache row; only the rest of the prompt is prefilled.
Time to first audio then does not grow with the voice clip's length, and the clip is run through
Mimi once, not once per reply.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from cachetools import LRUCache

from misotts_agents.audio import SAMPLE_RATE, to_mono
from misotts_agents.errors import InvalidRequest

if TYPE_CHECKING:  # VoicePrompt is built by clients that never load torch
    import torch


@dataclass(frozen=True)
class VoicePrompt:
    """A reference clip of the voice to speak with; validated and converted to 24 kHz mono once."""

    speaker: int
    text: str
    audio: np.ndarray | torch.Tensor
    sample_rate: int = SAMPLE_RATE
    key: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise InvalidRequest("voice prompt: the transcript is empty")
        if not isinstance(self.speaker, int) or self.speaker < 0:
            raise InvalidRequest(f"voice prompt: speaker must be a non-negative integer, got {self.speaker!r}")
        audio = to_mono(self.audio, self.sample_rate, what="voice prompt audio")
        object.__setattr__(self, "audio", audio)
        object.__setattr__(self, "sample_rate", SAMPLE_RATE)
        digest = hashlib.sha1(audio.tobytes())
        digest.update(f"\x00{self.speaker}\x00{self.text}".encode())
        object.__setattr__(self, "key", digest.hexdigest())


@dataclass
class CachedVoice:
    tokens: torch.Tensor  # (V, K+1) prompt frames of the voice segment
    mask: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per backbone layer, (n_kv, V, head_dim)


class VoiceCache:
    """A small LRU of voice prompts: their frames (Mimi codes) and, once computed, their KV prefix.

    The prefix of a new voice is computed by one request (the first to reach its prefill, which
    :meth:`claim` s it); others with the same voice wait for it and copy it (:meth:`shared_prefix`):
    preparation threads may each have made their own entry for the same new voice.
    """

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._items: LRUCache[str, CachedVoice] = LRUCache(capacity)
        self._computing: set[str] = set()  # voices whose prefix a request is computing now
        self._lock = threading.Lock()  # the preparation thread and the scheduler both use it
        self.hits = 0
        self.misses = 0

    def shared_prefix(self, key: str, voice: CachedVoice) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The voice's prefix KV if known: its own, or that of the cache's entry under its key."""
        if voice.kv is None:
            cached = self.get(key)
            if cached is not None:
                voice.kv = cached.kv
        return voice.kv

    def claim(self, key: str) -> bool:
        """True if the caller is to compute the voice's prefix (nobody else is); it then
        :meth:`publish` es it, or :meth:`release` s the claim if its request ends first."""
        with self._lock:
            if key in self._computing:
                return False
            self._computing.add(key)
            return True

    def publish(self, key: str, voice: CachedVoice, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The prefix is computed: it goes to the request's voice and to the cache's entry (which
        the voice becomes if the cache has none), and the requests waiting for it copy it."""
        voice.kv = kv
        with self._lock:
            self._computing.discard(key)
            cached = self._items.get(key)
            if cached is None:
                self._items[key] = voice
            elif cached.kv is None:
                cached.kv = kv

    def release(self, key: str) -> None:
        """The request computing the prefix ended before it was done: the next one takes it on."""
        with self._lock:
            self._computing.discard(key)

    def get(self, key: str) -> CachedVoice | None:
        with self._lock:
            return self._items.get(key)

    def put(self, key: str, item: CachedVoice) -> None:
        with self._lock:
            self._items[key] = item

    def __len__(self) -> int:
        return len(self._items)

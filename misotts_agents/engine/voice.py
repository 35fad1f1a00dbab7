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
    """A small LRU of voice prompts: their frames (Mimi codes) and, once computed, their KV prefix."""

    def __init__(self, capacity: int = 16) -> None:
        self.capacity = capacity
        self._items: LRUCache[str, CachedVoice] = LRUCache(capacity)
        self._lock = threading.Lock()  # the preparation thread and the scheduler both use it
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> CachedVoice | None:
        with self._lock:
            return self._items.get(key)

    def put(self, key: str, item: CachedVoice) -> None:
        with self._lock:
            self._items[key] = item

    def __len__(self) -> int:
        return len(self._items)

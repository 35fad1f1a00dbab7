"""The interleaved text/audio prompt, built exactly as the reference builds it.

Each context segment becomes a text frame run ``[speaker] text`` (text in the last column) followed
by its audio as Mimi frames (codes in the first K columns) and one all-zero end-of-audio frame. The
text to speak comes last, as a text run. When the prompt would not leave room for the requested
generation length within the model's 2048 positions, the oldest segments are dropped, with a warning.

An optional voice prompt goes first and is never dropped (its KV prefix is cached, see voice.py);
the reference has no such pinning: it treats the voice clip as just the oldest context segment.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from cachetools import LRUCache

from misotts_agents.audio import FRAME_SAMPLES, to_mono
from misotts_agents.engine.request import Segment
from misotts_agents.errors import InvalidRequest
from misotts_agents.model.config import MAX_SEQ_LEN
from misotts_agents.model.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    tokens: torch.Tensor  # (S, K+1) int64
    mask: torch.Tensor  # (S, K+1) bool
    max_frames: int
    dropped_segments: int
    prefix_len: int = 0  # leading frames that belong to the (cached) voice prompt

    @property
    def length(self) -> int:
        return self.tokens.size(0)


def text_frames(ids: list[int], num_codebooks: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.zeros(len(ids), num_codebooks + 1, dtype=torch.long)
    mask = torch.zeros(len(ids), num_codebooks + 1, dtype=torch.bool)
    tokens[:, -1] = torch.tensor(ids, dtype=torch.long)
    mask[:, -1] = True
    return tokens, mask


def audio_frames(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, T) codes -> (T+1, K+1) frames ending in the all-zero end-of-audio frame (masked in, as the reference)."""
    k, t = codes.shape
    tokens = torch.zeros(t + 1, k + 1, dtype=torch.long)
    mask = torch.zeros(t + 1, k + 1, dtype=torch.bool)
    tokens[:t, :k] = codes.transpose(0, 1).to(torch.long)
    mask[:, :k] = True
    return tokens, mask


class PromptBuilder:
    """Turns (voice, context segments, text) into prompt frames.

    ``encode_audio`` maps 24 kHz mono -> (K, T) Mimi codes. The codes of recent clips are kept in a
    small LRU keyed by their content, because a conversation re-sends the same earlier turns with
    every reply. Thread-safe: the engine prepares requests on several threads (preparation.py).
    """

    def __init__(
        self,
        tokenizer: TextTokenizer,
        encode_audio: Callable[[torch.Tensor], torch.Tensor],
        num_codebooks: int,
        codes_cache_size: int = 64,
    ) -> None:
        self.tokenizer = tokenizer
        self.encode_audio = encode_audio
        self.num_codebooks = num_codebooks
        self._codes: LRUCache[str, torch.Tensor] = LRUCache(codes_cache_size)
        self._lock = threading.Lock()

    def audio_codes(self, audio: np.ndarray) -> torch.Tensor:
        key = hashlib.sha1(audio.tobytes()).hexdigest()
        with self._lock:
            codes = self._codes.get(key)
            if codes is not None:
                return codes
        codes = self.encode_audio(torch.from_numpy(audio))  # outside the lock: other threads go on
        with self._lock:
            self._codes[key] = codes
        return codes

    def segment_frames(self, speaker: int, text: str, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Text run then audio run (with its end frame) of one 24 kHz mono segment."""
        t1, m1 = text_frames(self.tokenizer.encode(text, speaker), self.num_codebooks)
        t2, m2 = audio_frames(self.audio_codes(audio))
        return torch.cat([t1, t2]), torch.cat([m1, m2])

    def build(
        self,
        text: str,
        speaker: int,
        context: Sequence[Segment],
        max_frames: int,
        voice: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Prompt:
        """``voice`` is the (tokens, mask) frames of a voice prompt, placed first and never dropped."""
        max_context = MAX_SEQ_LEN - max_frames
        gen_tokens, gen_mask = text_frames(self.tokenizer.encode(text, speaker), self.num_codebooks)
        voice_len = voice[0].size(0) if voice is not None else 0
        if voice_len + gen_tokens.size(0) >= max_context:
            raise InvalidRequest(
                f"text too long: {gen_tokens.size(0)} tokens (+ {voice_len} voice-prompt frames) leave no room in "
                f"the {max_context}-position budget ({MAX_SEQ_LEN} minus {max_frames} frames of audio); "
                "split it into sentences or use a shorter voice clip"
            )
        # Size every segment first (text ids + ceil(samples / 1920) + 1 end frame) so that the
        # segments about to be dropped are never run through the audio encoder.
        sized = []
        for i, seg in enumerate(context):
            if not isinstance(seg, Segment):
                raise InvalidRequest(f"context[{i}] is a {type(seg).__name__}, expected a Segment")
            ids = self.tokenizer.encode(seg.text, seg.speaker)
            audio = to_mono(seg.audio, seg.sample_rate, what=f"context[{i}] audio")
            sized.append((ids, audio, len(ids) + math.ceil(audio.size / FRAME_SAMPLES) + 1))
        budget = max_context - gen_tokens.size(0) - voice_len
        total = sum(n for _, _, n in sized)
        dropped = 0
        while total > budget and dropped < len(sized):
            total -= sized[dropped][2]
            dropped += 1
        if dropped:
            message = f"context too long: dropped {dropped} oldest segment(s) to fit the {max_context}-frame limit"
            warnings.warn(message, stacklevel=3)
            log.warning(message)
        tokens, masks = ([voice[0]], [voice[1]]) if voice is not None else ([], [])
        for ids, audio, _ in sized[dropped:]:
            for t, m in (text_frames(ids, self.num_codebooks), audio_frames(self.audio_codes(audio))):
                tokens.append(t)
                masks.append(m)
        tokens.append(gen_tokens)
        masks.append(gen_mask)
        return Prompt(torch.cat(tokens), torch.cat(masks), max_frames, dropped, prefix_len=voice_len)

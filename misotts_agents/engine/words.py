"""Word timings: which words of a request's text each audio chunk covers, and when each starts.

The model generates audio frames, not an alignment, so the timings are **estimates**: a sentence's
audio is spread over its words in proportion to their length (characters, plus one for the gap
after the word; punctuation counts as characters, which stands in for the pause it brings).

While the sentence is still being generated its length is unknown. It is taken as the longer of
(a) the text read at ``CHARS_PER_S`` and (b) the audio so far, stretched just enough that the last
word has not started yet (the sentence is not over, so its last word cannot have been reached). A
word is handed out, once and in order, with the chunk during whose audio its estimated start falls.
When the sentence ends by itself (end of speech) its real length is known: the words still to come
are placed by their share of that length. When it is cut by a length limit, the words that did not
fit are never handed out (they were never spoken); a cancelled request hands out nothing more.

What this is good for: turning "how much audio was heard" into "which words were heard" (the
integrations' transcripts and the turn memory), to within a word or so. What it is not: a forced
alignment. Leading or trailing silence and uneven pacing shift real word starts away from the
proportional estimate; the estimate never leaves the sentence's audio and keeps the words in order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Typical conversational English read aloud (~150 words a minute at ~5.5 characters a word with its
# space). Only a prior: once audio runs longer than this predicts, the audio's length takes over.
CHARS_PER_S = 14.0

# Clause ends where a long sentence may be split without cutting a phrase in two.
_CLAUSE_END = re.compile(r"(?<=[,;:\u2014\u2013)])\s+|\s+(?=[\u2014\u2013(])")


@dataclass(frozen=True)
class WordTiming:
    """One word of a request's text and its estimated start and end, in seconds from the request's
    first audio sample (its ``AudioChunk.start_frame`` 0)."""

    word: str
    start_s: float
    end_s: float


def words_of(text: str) -> list[str]:
    """The words of ``text`` as they are timed: whitespace-separated, punctuation kept on its word."""
    return text.split()


def estimated_duration_s(text: str) -> float:
    """How long ``text`` takes to say at ``CHARS_PER_S`` (the prior for word timings and for splitting)."""
    return sum(len(w) + 1 for w in words_of(text)) / CHARS_PER_S


class WordAligner:
    """Hands out the words of one request's text as its audio arrives (see the module docstring).

    Feed it the end of each chunk (``advance``), in order; the last call says how the audio ended.
    """

    def __init__(self, text: str) -> None:
        self.words = words_of(text)
        weights = [len(w) + 1 for w in self.words]
        self._before = [0] * len(weights)  # weight of the words before each word
        for i in range(1, len(weights)):
            self._before[i] = self._before[i - 1] + weights[i - 1]
        self._total = self._before[-1] + weights[-1] if weights else 0
        self._prior_s = self._total / CHARS_PER_S
        self._next = 0  # the first word not handed out yet
        self._last_start = 0.0
        self._length_s = self._prior_s  # the current estimate of the sentence's length (only grows)

    @property
    def remaining(self) -> int:
        """Words not handed out yet."""
        return len(self.words) - self._next

    def advance(self, end_s: float, *, ended: bool = False) -> tuple[WordTiming, ...]:
        """The words that start before ``end_s`` seconds of audio and were not handed out yet.

        ``ended``: the sentence ended by itself at ``end_s`` (end of speech): every remaining word is
        handed out, placed by its share of the real length ``end_s``.
        """
        if self._next >= len(self.words):
            return ()
        if ended:
            length, upto = end_s, len(self.words)
        else:
            length, upto = self._estimate(end_s), None
        out: list[WordTiming] = []
        i = self._next
        while i < len(self.words):
            start = max(self._before[i] / self._total * length, self._last_start)
            if upto is None and start >= end_s:
                break
            stop = self._before[i + 1] / self._total * length if i + 1 < len(self.words) else length
            out.append(WordTiming(self.words[i], start, max(stop, start)))
            self._last_start = start
            i += 1
        self._next = i
        return tuple(out)

    def _estimate(self, end_s: float) -> float:
        # Not over yet: at least long enough that the last word starts at or after end_s.
        last = self._before[-1]
        floor = end_s * self._total / last if last else end_s
        self._length_s = max(self._length_s, self._prior_s, floor)
        return self._length_s


def heard_text(words: Iterable[tuple[float, str]], heard_s: float) -> str:
    """The words (``(start_s, word)``, in order) that had started within ``heard_s`` seconds."""
    return " ".join(w for start, w in words if start < heard_s)


def split_for_length(text: str, max_s: float) -> list[str]:
    """``text`` cut into pieces that each fit in ``max_s`` seconds at ``CHARS_PER_S``: at clause
    boundaries (commas, semicolons, colons, dashes) first, then between words; never inside a word.

    A sentence the model would otherwise cut at its per-request limit is spoken whole, in parts.
    """
    if estimated_duration_s(text) <= max_s:
        return [text]
    pieces: list[str] = []
    for clause in _CLAUSE_END.split(text):
        clause = clause.strip()
        if not clause:
            continue
        for part in _fit(clause, max_s):
            if pieces and estimated_duration_s(f"{pieces[-1]} {part}") <= max_s:
                pieces[-1] = f"{pieces[-1]} {part}"  # short clauses travel together
            else:
                pieces.append(part)
    return pieces


def _fit(clause: str, max_s: float) -> Sequence[str]:
    if estimated_duration_s(clause) <= max_s:
        return [clause]
    out: list[str] = []
    current: list[str] = []
    for word in words_of(clause):
        if current and estimated_duration_s(" ".join([*current, word])) > max_s:
            out.append(" ".join(current))
            current = []
        current.append(word)
    if current:
        out.append(" ".join(current))
    return out

"""TextFeed: the text of one utterance arriving in pieces (an LLM's tokens), cut into speakable parts.

The model speaks a whole text per request, so streamed text is spoken sentence by sentence: a part
is taken as soon as a sentence ends, and the first sentence's audio starts while the LLM is still
writing the rest. A client may force out what it has (``flush``), and ``end`` says no more comes.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from misotts_agents.server.protocol import ProtocolError

# The end of a sentence: terminal punctuation (with closing quotes or brackets) before whitespace,
# CJK full stops, or a line break. "Dr. Smith" splits too; that costs a little prosody, never words.
SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+|[\u3002\uff01\uff1f]+|\n+")


class TextFeed:
    """Pieces in, speakable parts out; ``max_chars`` bounds the text held unspoken."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self._buf = ""
        self._flush = False
        self._ended = False
        self._changed = asyncio.Event()

    @property
    def ended(self) -> bool:
        return self._ended

    def append(self, text: str, flush: bool = False) -> None:
        if self._ended:
            raise ProtocolError("bad_message", "this request's text has already ended")
        if len(self._buf) + len(text) > self.max_chars:
            raise ProtocolError(
                "too_large", f"more than {self.max_chars} characters of text are waiting to be spoken; send a flush"
            )
        self._buf += text
        self._flush = self._flush or flush
        self._changed.set()

    def end(self) -> None:
        self._ended = True
        self._changed.set()

    async def parts(self) -> AsyncIterator[tuple[str, bool]]:
        """Each part to speak, and whether it is the last (known only when the end came first)."""
        while True:
            part = self._take()
            if part:
                yield part, self._ended and not self._buf.strip()
            elif self._ended:
                return
            else:
                self._changed.clear()
                await self._changed.wait()

    def _take(self) -> str:
        while match := SENTENCE_END.search(self._buf):
            part, self._buf = self._buf[: match.end()].strip(), self._buf[match.end() :]
            if part:  # (a blank line is no sentence)
                return part
        if self._ended or self._flush:  # the rest, though no sentence end came
            part, self._buf, self._flush = self._buf.strip(), "", False
            return part
        return ""

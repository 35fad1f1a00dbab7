"""The Llama-3.2 text tokenizer, with the reference's begin/end-of-text wrapping.

Built on the `tokenizers` library alone (no transformers): the reference swaps the tokenizer's
post-processor for a template that puts ``<|begin_of_text|>`` before and ``<|end_of_text|>`` after
``"[{speaker}] {text}"``; we install the same template, which gives identical ids.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from misotts_agents.errors import CheckpointError, InvalidRequest

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"


class TextTokenizer:
    def __init__(self, path: str | Path) -> None:
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
            raise CheckpointError(f"cannot read tokenizer {path}: {exc}") from exc
        bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
        if bos_id is None or eos_id is None:
            raise CheckpointError(f"{path} is not a Llama-3 tokenizer: it lacks {BOS} / {EOS}")
        tok.post_processor = TemplateProcessing(
            single=f"{BOS}:0 $A:0 {EOS}:0",
            pair=f"{BOS}:0 $A:0 {EOS}:0 {BOS}:1 $B:1 {EOS}:1",
            special_tokens=[(BOS, bos_id), (EOS, eos_id)],
        )
        self._tok = tok
        self.path = Path(path)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, speaker: int) -> list[int]:
        """Token ids of one utterance as the reference writes it: ``[speaker] text`` wrapped in BOS/EOS."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequest("text is empty: give the words to speak")
        if not isinstance(speaker, int) or speaker < 0:
            raise InvalidRequest(f"speaker must be a non-negative integer, got {speaker!r}")
        return self._tok.encode(f"[{speaker}] {text.lstrip()}").ids

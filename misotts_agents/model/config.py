"""Model configuration: the reference's `config.json` fields and the transformer flavors.

A flavor is either one of the reference's names (``llama-8B``, ``llama-300M`` for MisoTTS 8B;
``llama-1B``, ``llama-100M`` for Sesame CSM-1B) or a dict of explicit sizes, so tests can ship tiny
checkpoints in the very same format as the real ones.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

MAX_SEQ_LEN = 2048  # backbone positions; the reference's generate() budget
NUM_CODEBOOKS = 32  # codebooks per frame (Mimi has 32; moshi's default of 8 is for Moshi itself)
NORM_EPS = 1e-5
ROPE_BASE = 500_000.0
# Llama-3 RoPE scaling used by every MisoTTS / CSM flavor (torchtune Llama3ScaledRoPE).
ROPE_SCALE_FACTOR = 32.0
ROPE_LOW_FREQ_FACTOR = 1.0
ROPE_HIGH_FREQ_FACTOR = 4.0
ROPE_OLD_CONTEXT_LEN = 8192

# How the transformers' linear layers hold their weights (model/quantized.py): the model's dtype,
# or 8 bits with a scale per output channel.
WeightFormat = Literal["bf16", "int8", "fp8"]
WEIGHT_FORMATS: tuple[WeightFormat, ...] = get_args(WeightFormat)


def parse_weights(value: str) -> WeightFormat:
    """The weight format named by ``value`` (``ValueError`` listing the known ones otherwise)."""
    if value not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}; got {value!r}")
    return cast("WeightFormat", value)


@dataclass(frozen=True)
class Flavor:
    """Sizes of one Llama-3.2-style transformer."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def validate(self, what: str) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{what}: {name} must be a positive integer, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{what}: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{what}: num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"{what}: head_dim {self.head_dim} must be even for RoPE")


FLAVORS: dict[str, Flavor] = {
    "llama-8B": Flavor(num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096, intermediate_dim=14336),
    "llama-300M": Flavor(num_layers=8, num_heads=24, num_kv_heads=6, embed_dim=1536, intermediate_dim=6912),
    "llama-1B": Flavor(num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192),
    "llama-100M": Flavor(num_layers=4, num_heads=8, num_kv_heads=2, embed_dim=1024, intermediate_dim=8192),
}


def resolve_flavor(spec: str | dict[str, Any], what: str) -> Flavor:
    """Turn a flavor name or an explicit-size dict from `config.json` into a :class:`Flavor`."""
    if isinstance(spec, str):
        try:
            return FLAVORS[spec]
        except KeyError:
            raise ValueError(f"{what}: unknown flavor {spec!r}; known: {sorted(FLAVORS)} or a dict of sizes") from None
    if isinstance(spec, dict):
        expected = set(Flavor.__dataclass_fields__)
        if set(spec) != expected:
            raise ValueError(f"{what}: a custom flavor needs exactly the keys {sorted(expected)}, got {sorted(spec)}")
        flavor = Flavor(**spec)
        flavor.validate(what)
        return flavor
    raise ValueError(f"{what}: a flavor is a name or a dict, got {type(spec).__name__}")


@dataclass(frozen=True)
class ModelConfig:
    """The fields of the reference's `config.json` (ModelArgs), with flavors resolved."""

    backbone_flavor: str | dict[str, Any]
    decoder_flavor: str | dict[str, Any]
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051
    audio_num_codebooks: int = NUM_CODEBOOKS

    @property
    def backbone(self) -> Flavor:
        return resolve_flavor(self.backbone_flavor, "backbone_flavor")

    @property
    def decoder(self) -> Flavor:
        return resolve_flavor(self.decoder_flavor, "decoder_flavor")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> ModelConfig:
        fields = set(cls.__dataclass_fields__)
        known = {k: v for k, v in data.items() if k in fields}
        missing = {"backbone_flavor", "decoder_flavor"} - set(known)
        if missing:
            raise ValueError(f"{source}: missing {sorted(missing)}")
        config = cls(**known)
        _ = config.backbone, config.decoder  # validates both flavors now, not at first use
        for name in ("text_vocab_size", "audio_vocab_size", "audio_num_codebooks"):
            if not isinstance(getattr(config, name), int) or getattr(config, name) <= 0:
                raise ValueError(f"{source}: {name} must be a positive integer")
        return config

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"model config not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MISOTTS_8B = ModelConfig(backbone_flavor="llama-8B", decoder_flavor="llama-300M")
CSM_1B = ModelConfig(backbone_flavor="llama-1B", decoder_flavor="llama-100M")

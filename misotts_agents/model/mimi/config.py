"""Mimi's configuration: the nested dict layout moshi's loader takes, checked into typed settings.

The dict layout (``sample_rate``, ``channels``, ``frame_rate`` and the ``seanet`` / ``transformer`` /
``quantizer`` sections) is kept because ``mimi_config.json`` files written for moshi use it. Only what
this inference implementation reproduces exactly is accepted: any other value raises ``ValueError``
naming the key, rather than building a model that would silently differ from the original.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MimiSettings",
    "QuantizerSettings",
    "SeanetSettings",
    "TransformerSettings",
    "default_config",
    "parse_config",
]

# The released Mimi (kyutai's tokenizer-e351c8d8-checkpoint125): 24 kHz mono, SEANet hop 960 (25 Hz),
# a x2 learnt resampler to 12.5 Hz, 8-layer transformers of width 512 on both sides and 32 codebooks.
_DEFAULT_CONFIG: dict[str, Any] = {
    "sample_rate": 24000,
    "channels": 1,
    "frame_rate": 12.5,
    "seanet": {
        "channels": 1,
        "dimension": 512,
        "causal": True,
        "n_filters": 64,
        "n_residual_layers": 1,
        "activation": "ELU",
        "compress": 2,
        "dilation_base": 2,
        "disable_norm_outer_blocks": 0,
        "kernel_size": 7,
        "residual_kernel_size": 3,
        "last_kernel_size": 3,
        "norm": "none",
        "pad_mode": "constant",
        "ratios": [8, 6, 5, 4],
        "true_skip": True,
    },
    "quantizer": {
        "dimension": 256,
        "n_q": 32,
        "bins": 2048,
        "input_dimension": 512,
        "output_dimension": 512,
    },
    "transformer": {
        "d_model": 512,
        "num_heads": 8,
        "num_layers": 8,
        "causal": True,
        "layer_scale": 0.01,
        "context": 250,
        "conv_layout": True,
        "max_period": 10000,
        "gating": "none",
        "norm": "layer_norm",
        "positional_embedding": "rope",
        "dim_feedforward": 2048,
        "input_dimension": 512,
        "output_dimensions": [512],
    },
}

_TOP_KEYS = frozenset({"sample_rate", "channels", "frame_rate", "seanet", "transformer", "quantizer"})
_SEANET_KEYS = frozenset(_DEFAULT_CONFIG["seanet"])
_TRANSFORMER_KEYS = frozenset(_DEFAULT_CONFIG["transformer"])
_QUANTIZER_KEYS = frozenset(_DEFAULT_CONFIG["quantizer"])
# Optional keys moshi's constructors also take. The quantizer's training knobs change nothing at inference.
_SEANET_OPTIONAL = frozenset({"activation_params"})
_QUANTIZER_OPTIONAL = frozenset(
    {"n_q_semantic", "q_dropout", "no_quantization_rate", "decay", "threshold_usage_ratio", "replaced_usage_ratio"}
)


def default_config() -> dict[str, Any]:
    """The released Mimi's config (a fresh deep copy, safe to modify)."""
    return copy.deepcopy(_DEFAULT_CONFIG)


@dataclass(frozen=True)
class SeanetSettings:
    """The convolutional encoder/decoder (both are built from the same section)."""

    channels: int
    dimension: int
    n_filters: int
    n_residual_layers: int
    ratios: tuple[int, ...]  # decoder order (upsampling); the encoder uses them reversed
    kernel_size: int
    residual_kernel_size: int
    last_kernel_size: int
    dilation_base: int
    compress: int
    true_skip: bool
    elu_alpha: float

    @property
    def hop_length(self) -> int:
        """Audio samples per latent step."""
        return math.prod(self.ratios)


@dataclass(frozen=True)
class TransformerSettings:
    """One of the two (identical in shape) latent transformers."""

    d_model: int
    num_heads: int
    num_layers: int
    dim_feedforward: int
    context: int  # attention window in steps, also the ring KV cache capacity
    max_period: float
    layer_scale: float | None
    input_dimension: int
    output_dimension: int


@dataclass(frozen=True)
class QuantizerSettings:
    """The split residual vector quantizer."""

    dimension: int
    n_q: int
    n_q_semantic: int
    bins: int
    input_dimension: int
    output_dimension: int


@dataclass(frozen=True)
class MimiSettings:
    """A validated config; the derived sizes the model is built from."""

    sample_rate: int
    channels: int
    frame_rate: float
    seanet: SeanetSettings
    transformer: TransformerSettings
    quantizer: QuantizerSettings

    @property
    def resample_stride(self) -> int:
        """Latent steps per codec frame (2 for Mimi: 25 Hz SEANet latent, 12.5 Hz codes); 1 means none."""
        return round(self.sample_rate / self.seanet.hop_length / self.frame_rate)

    @property
    def frame_size(self) -> int:
        """Audio samples per codec frame."""
        return int(self.sample_rate / self.frame_rate)


def _fail(path: str, problem: str) -> ValueError:
    return ValueError(f"Mimi config {path}: {problem}")


def _check_keys(section: Mapping[str, Any], path: str, required: frozenset[str], optional: frozenset[str]) -> None:
    missing = sorted(required - set(section))
    if missing:
        raise _fail(f"{path}{missing[0]}", "missing key")
    unknown = sorted(set(section) - required - optional)
    if unknown:
        raise _fail(f"{path}{unknown[0]}", "unknown key")


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = config[name]
    if not isinstance(section, Mapping):
        raise _fail(name, f"expected a dict, got {type(section).__name__}")
    return section


def _int(section: Mapping[str, Any], key: str, path: str, minimum: int = 1) -> int:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path + key, f"expected an integer, got {value!r}")
    if value < minimum:
        raise _fail(path + key, f"must be >= {minimum}, got {value}")
    return value


def _number(section: Mapping[str, Any], key: str, path: str) -> float:
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise _fail(path + key, f"expected a positive number, got {value!r}")
    return float(value)


def _exactly(section: Mapping[str, Any], key: str, path: str, expected: object, why: str) -> None:
    value = section[key]
    if value != expected or type(value) is not type(expected):
        raise _fail(path + key, f"unsupported value {value!r} (only {expected!r}: {why})")


def _parse_seanet(section: Mapping[str, Any]) -> SeanetSettings:
    p = "seanet."
    _check_keys(section, p, _SEANET_KEYS, _SEANET_OPTIONAL)
    _exactly(section, "causal", p, True, "streaming needs causal convolutions")
    _exactly(section, "activation", p, "ELU", "the released model's activation")
    _exactly(section, "norm", p, "none", "inference weights have weight norm folded in")
    _exactly(section, "pad_mode", p, "constant", "zero left padding, as the released model")
    ratios = section["ratios"]
    if not isinstance(ratios, list | tuple) or not ratios:
        raise _fail(p + "ratios", f"expected a non-empty list of integers, got {ratios!r}")
    for ratio in ratios:
        if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
            raise _fail(p + "ratios", f"expected positive integers, got {ratios!r}")
    true_skip = section["true_skip"]
    if not isinstance(true_skip, bool):
        raise _fail(p + "true_skip", f"expected a boolean, got {true_skip!r}")
    disable = _int(section, "disable_norm_outer_blocks", p, minimum=0)  # no effect without a norm
    if disable > len(ratios) + 2:
        raise _fail(p + "disable_norm_outer_blocks", f"must be <= {len(ratios) + 2}, got {disable}")
    alpha = 1.0
    if "activation_params" in section:
        params = section["activation_params"]
        if not isinstance(params, Mapping) or set(params) - {"alpha"}:
            raise _fail(p + "activation_params", f"only {{'alpha': number}} is supported, got {params!r}")
        if "alpha" in params:
            alpha = _number(params, "alpha", p + "activation_params.")
    n_filters = _int(section, "n_filters", p)
    compress = _int(section, "compress", p)
    if n_filters // compress < 1:
        raise _fail(p + "compress", f"leaves no hidden channels for n_filters {n_filters}")
    return SeanetSettings(
        channels=_int(section, "channels", p),
        dimension=_int(section, "dimension", p),
        n_filters=n_filters,
        n_residual_layers=_int(section, "n_residual_layers", p, minimum=0),
        ratios=tuple(ratios),
        kernel_size=_int(section, "kernel_size", p),
        residual_kernel_size=_int(section, "residual_kernel_size", p),
        last_kernel_size=_int(section, "last_kernel_size", p),
        dilation_base=_int(section, "dilation_base", p),
        compress=compress,
        true_skip=true_skip,
        elu_alpha=alpha,
    )


def _parse_transformer(section: Mapping[str, Any], latent: int) -> TransformerSettings:
    p = "transformer."
    _check_keys(section, p, _TRANSFORMER_KEYS, frozenset())
    _exactly(section, "causal", p, True, "streaming needs causal attention")
    _exactly(section, "conv_layout", p, True, "the latent is (batch, channels, time)")
    _exactly(section, "gating", p, "none", "the released model's plain GELU feed-forward")
    _exactly(section, "norm", p, "layer_norm", "the released model's LayerNorm")
    _exactly(section, "positional_embedding", p, "rope", "the released model's rotary embedding")
    d_model = _int(section, "d_model", p)
    num_heads = _int(section, "num_heads", p)
    if d_model % num_heads or (d_model // num_heads) % 2:
        raise _fail(p + "num_heads", f"d_model {d_model} must split into heads of an even size")
    layer_scale = section["layer_scale"]
    if layer_scale is not None:
        layer_scale = _number(section, "layer_scale", p)
    if section["context"] is None:
        raise _fail(p + "context", "unsupported value None (streaming needs a finite window)")
    if section["input_dimension"] != latent:
        raise _fail(p + "input_dimension", f"must equal seanet.dimension {latent}, got {section['input_dimension']!r}")
    outputs = section["output_dimensions"]
    if not isinstance(outputs, list | tuple) or list(outputs) != [latent]:
        raise _fail(p + "output_dimensions", f"must be [{latent}] (seanet.dimension), got {outputs!r}")
    return TransformerSettings(
        d_model=d_model,
        num_heads=num_heads,
        num_layers=_int(section, "num_layers", p),
        dim_feedforward=_int(section, "dim_feedforward", p),
        context=_int(section, "context", p),
        max_period=_number(section, "max_period", p),
        layer_scale=layer_scale,
        input_dimension=latent,
        output_dimension=latent,
    )


def _parse_quantizer(section: Mapping[str, Any], latent: int) -> QuantizerSettings:
    p = "quantizer."
    _check_keys(section, p, _QUANTIZER_KEYS, _QUANTIZER_OPTIONAL)
    n_q = _int(section, "n_q", p)
    n_q_semantic = _int(section, "n_q_semantic", p) if "n_q_semantic" in section else 1
    if n_q <= n_q_semantic:
        raise _fail(p + "n_q", f"must exceed the {n_q_semantic} semantic codebook(s), got {n_q}")
    for key in ("input_dimension", "output_dimension"):
        if section[key] != latent:
            raise _fail(p + key, f"must equal seanet.dimension {latent}, got {section[key]!r}")
    return QuantizerSettings(
        dimension=_int(section, "dimension", p),
        n_q=n_q,
        n_q_semantic=n_q_semantic,
        bins=_int(section, "bins", p),
        input_dimension=latent,
        output_dimension=latent,
    )


def parse_config(config: Mapping[str, Any]) -> MimiSettings:
    """Check ``config`` (moshi's layout) and return its settings; ``ValueError`` names the first bad key."""
    if not isinstance(config, Mapping):
        raise ValueError(f"Mimi config: expected a dict, got {type(config).__name__}")
    _check_keys(config, "", _TOP_KEYS, frozenset())
    seanet = _parse_seanet(_section(config, "seanet"))
    settings = MimiSettings(
        sample_rate=_int(config, "sample_rate", ""),
        channels=_int(config, "channels", ""),
        frame_rate=_number(config, "frame_rate", ""),
        seanet=seanet,
        transformer=_parse_transformer(_section(config, "transformer"), seanet.dimension),
        quantizer=_parse_quantizer(_section(config, "quantizer"), seanet.dimension),
    )
    if settings.channels != 1:
        raise _fail("channels", f"unsupported value {settings.channels} (only mono, 1)")
    if seanet.channels != settings.channels:
        raise _fail("seanet.channels", f"must equal channels {settings.channels}, got {seanet.channels}")
    # moshi derives the latent rate from the hop and resamples it to frame_rate by an integer factor.
    latent_rate = settings.sample_rate / seanet.hop_length
    stride = latent_rate / settings.frame_rate
    if stride < 1 or stride != round(stride):
        raise _fail("frame_rate", f"{settings.frame_rate} is not the latent rate {latent_rate} over an integer")
    if settings.frame_size != seanet.hop_length * settings.resample_stride:
        raise _fail("frame_rate", f"{settings.frame_rate} does not give a whole number of samples per frame")
    return settings

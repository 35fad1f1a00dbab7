"""The memory-bandwidth floor of a frame step: what no implementation can beat on a given GPU.

Every frame step reads all the weights it uses once: the backbone once, and the depth decoder
(plus the projection and one audio-head slice) 31 times, once per codebook. It also reads every
row's KV cache: the backbone's over the positions that row has used, the depth decoder's over the
1..32 positions of each of its 31 steps. So a step of ``batch`` rows at ``context`` positions
cannot take less than ``bytes_per_frame(config, ..., batch, context) / memory_bandwidth``; the
weights dominate at low batch, the KV reads at long contexts times many rows (for the 8B model in
bf16, 128 rows at 2,000 positions read about as much KV as weights).
"""

from __future__ import annotations

import math

import torch

from misotts_agents.model.config import ModelConfig

# Peak memory bandwidth in GB/s from the vendors' data sheets, matched against
# torch.cuda.get_device_name(); the first matching key wins (more specific names first).
KNOWN_BANDWIDTH_GBS: dict[str, float] = {
    "H200": 4800,
    "H100 PCIe": 2000,
    "H100 NVL": 3900,
    "H100": 3350,  # SXM
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,  # 40 GB
    "L40S": 864,
    "L40": 864,
    "RTX 6000 Ada": 960,
    "RTX A6000": 768,
    "A10G": 600,
    "A10": 600,
    "L4": 300,
    "RTX 5090": 1792,
    "RTX 4090": 1008,
    "RTX 3090": 936,
}


def gpu_bandwidth_gbs(device: torch.device) -> tuple[float | None, str]:
    """(peak GB/s or None if unknown, device name) for a CUDA device."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, gbs in KNOWN_BANDWIDTH_GBS.items():
        if key in name:
            return gbs, name
    return None, name


def weight_bytes_per_frame(config: ModelConfig, bytes_per_param: int, linear_bytes: int | None = None) -> int:
    """Weight bytes one frame step reads (batch-independent while memory-bound); ``linear_bytes``:
    the stacks' linear layers' own width when 8-bit (model/quantized.py; their scales neglected)."""
    b, d = config.backbone, config.decoder
    k, vocab = config.audio_num_codebooks, config.audio_vocab_size
    width = bytes_per_param if linear_bytes is None else linear_bytes

    def transformer(f):  # attention (q, k, v, out) + SwiGLU, then the norms
        attn = f.embed_dim * f.head_dim * (2 * f.num_heads + 2 * f.num_kv_heads)
        linears = f.num_layers * (attn + 3 * f.embed_dim * f.intermediate_dim)
        return linears * width + (2 * f.num_layers + 1) * f.embed_dim * bytes_per_param

    backbone = transformer(b) + vocab * b.embed_dim * bytes_per_param  # + codebook-0 head
    heads = (d.embed_dim * b.embed_dim + d.embed_dim * vocab) * bytes_per_param  # projection, head slice
    return backbone + (k - 1) * (transformer(d) + heads)


def kv_bytes_per_frame(config: ModelConfig, bytes_per_param: int, batch: int, context: int) -> int:
    """KV-cache bytes one frame step reads for ``batch`` rows, each ``context`` positions deep.

    Backbone: keys and values of every layer over the ``context`` positions (the new one included).
    Depth decoder: its step i (1..31) reads positions 0..i (the first step 0..1).
    """
    b, d = config.backbone, config.decoder

    def per_position(f):  # keys + values, all layers
        return 2 * f.num_layers * f.num_kv_heads * f.head_dim

    depth_positions = sum(max(i, 1) + 1 for i in range(1, config.audio_num_codebooks))
    return batch * (per_position(b) * context + per_position(d) * depth_positions) * bytes_per_param


def bytes_per_frame(
    config: ModelConfig, bytes_per_param: int, batch: int = 1, context: int = 0, linear_bytes: int | None = None
) -> int:
    """Bytes one frame step must read: the weights once, plus ``batch`` rows' KV at ``context`` positions."""
    kv = kv_bytes_per_frame(config, bytes_per_param, batch, context) if context else 0
    return weight_bytes_per_frame(config, bytes_per_param, linear_bytes) + kv


def floor_ms(
    config: ModelConfig,
    bytes_per_param: int,
    bandwidth_gbs: float,
    batch: int = 1,
    context: int = 0,
    linear_bytes: int | None = None,
) -> float:
    return bytes_per_frame(config, bytes_per_param, batch, context, linear_bytes) / (bandwidth_gbs * 1e9) * 1e3


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8 if dtype.is_floating_point else math.ceil(torch.iinfo(dtype).bits / 8)

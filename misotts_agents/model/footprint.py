"""Device memory a deployment needs: weight bytes per format, KV cache per stream, streams that fit.

Counted from the model's own layout (its ``state_dict`` built on the ``meta`` device, so nothing is
allocated), not typed in: 8-bit weights are 1 byte plus their scales (bf16 for int8, fp32 for fp8),
everything else bf16. A stream is one KV-cache row (engine/scheduler.py): the backbone's keys and
values for every position up to the full context, and the depth decoder's for its 32, in bf16.
"""

from __future__ import annotations

import torch

from misotts_agents.model.config import MAX_SEQ_LEN, ModelConfig, WeightFormat
from misotts_agents.model.quantized import STORAGE, scale_dtype
from misotts_agents.model.transformer import MisoModel
from misotts_agents.model.weights import layout

KV_BYTES = 2  # bf16 caches
# Device memory kept out of the KV budget: the CUDA context, Mimi and SilentCipher, the frame step's
# activations and CUDA-graph pools, the allocator's slack. A budget, not a measurement (the GPU
# check measures the peak: scripts/gpu_check.sh).
RESERVE_BYTES = 4 << 30


def weight_bytes(config: ModelConfig, weights: WeightFormat) -> int:
    """Bytes of the model's tensors with ``weights`` linear layers (the rest in bf16)."""
    total = 0
    for key, t in layout(config, weights).items():
        if t.dtype in STORAGE.values():
            size = 1
        elif key.endswith(".weight_scale"):
            size = scale_dtype(weights, torch.bfloat16).itemsize
        else:
            size = KV_BYTES
        total += t.numel() * size
    return total


def kv_bytes_per_stream(config: ModelConfig, context: int = MAX_SEQ_LEN) -> int:
    """One stream's KV cache: the backbone's at ``context`` positions and the depth decoder's."""
    b, d = config.backbone, config.decoder
    per_position = [2 * f.num_layers * f.num_kv_heads * f.head_dim * KV_BYTES for f in (b, d)]
    return per_position[0] * context + per_position[1] * config.audio_num_codebooks


def streams_that_fit(
    config: ModelConfig,
    weights: WeightFormat,
    device_bytes: int,
    reserve: int = RESERVE_BYTES,
    context: int = MAX_SEQ_LEN,
) -> int:
    """Streams at ``context`` positions whose KV fits beside the weights and the reserve."""
    free = device_bytes - reserve - weight_bytes(config, weights)
    return max(0, free // kv_bytes_per_stream(config, context))


def device_memory(model: MisoModel, reserve: int = RESERVE_BYTES) -> dict[str, float]:
    """A loaded model's weights as they are on its device, and on CUDA the allocator's peak so far
    and the streams at full context that fit beside the weights and ``reserve`` (GB, counts)."""
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    kv = kv_bytes_per_stream(model.config)
    out = {"weights_gb": held / 1e9, "kv_per_stream_mb": kv / 1e6}
    if model.device.type == "cuda":
        total = torch.cuda.get_device_properties(model.device).total_memory
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated(model.device) / 1e9
        out["device_gb"] = total / 1e9
        out["streams_at_full_context"] = max(0, (total - reserve - held) // kv)
    return out

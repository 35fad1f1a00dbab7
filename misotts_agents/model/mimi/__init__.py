"""Mimi, kyutai's neural audio codec, in plain PyTorch for inference (moshi 0.2.13's numbers).

MisoTTS speaks in Mimi codes (32 codebooks x 2048 bins per 80 ms frame at 24 kHz). This package
builds the codec from moshi's config layout, loads its checkpoints strictly under the same parameter
names, and encodes / decodes whole clips exactly as moshi does. It adds a batched streaming decoder
whose per-stream state is explicit (:class:`DecodeState`) and whose step is CUDA-graph capturable.
moshi itself is not imported: its pinned dependencies conflict with the rest of the stack.

Modules: ``config`` (the dict layout and its checks), ``conv`` (causal convolutions), ``seanet``
(convolutional encoder/decoder), ``transformer`` (windowed RoPE transformer with ring KV cache),
``quantizer`` (split residual VQ), ``model`` (the whole codec).
"""

from misotts_agents.model.mimi.config import MimiSettings, default_config, parse_config
from misotts_agents.model.mimi.model import DecodeState, MimiModel, rename_checkpoint_keys

__all__ = [
    "DecodeState",
    "MimiModel",
    "MimiSettings",
    "default_config",
    "parse_config",
    "rename_checkpoint_keys",
]

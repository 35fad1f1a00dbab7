"""How far a model's outputs move when its weights change format (bf16, int8): teacher-forced logits.

One sequence of audio frames is fed to the model at once: the backbone over every frame (one
prefill), then the depth decoder over every frame's 32 positions as a batch, so each model sees
the same inputs whatever it predicts, and the logits of codebook 0 (backbone head) and codebooks
1..31 (depth decoder) can be compared frame by frame, as can every layer's output. For
benchmarks/quantization.py and the bound tests/test_quantized.py asserts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from misotts_agents.model.transformer import MisoModel


@dataclass
class Outputs:
    c0_logits: torch.Tensor  # (frames - 1, vocab): codebook 0 of frame t + 1 from frame t's hidden state
    depth_logits: torch.Tensor  # (frames - 1, codebooks - 1, vocab)
    layers: dict[str, torch.Tensor]  # "backbone.3" -> that layer's output (fp32)


@torch.no_grad()
def teacher_forced(model: MisoModel, codes: torch.Tensor) -> Outputs:
    """The model's logits for ``codes`` (frames, codebooks), each frame predicted from the ones before.

    It sizes the model's KV caches for this (one backbone row, a decoder row per frame): a model of
    its own, not an engine's."""
    frames, k = codes.shape
    device, dtype = model.device, model.dtype
    codes = codes.to(device)
    model.backbone.setup_caches(1, dtype, device)
    model.decoder.setup_caches(frames - 1, dtype, device)
    layers: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module: torch.nn.Module, _inputs: object, out: torch.Tensor) -> None:
            layers[name] = out.float()

        return hook

    hooks = [
        layer.register_forward_hook(keep(f"{stack}.{i}"))
        for stack, transformer in (("backbone", model.backbone), ("decoder", model.decoder))
        for i, layer in enumerate(transformer.layers)
    ]
    try:
        tokens = torch.zeros(1, frames, k + 1, dtype=torch.long, device=device)
        tokens[0, :, :k] = codes
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        mask[..., :k] = True
        positions = torch.arange(frames, device=device)[None]
        h = model.backbone(model.embed_frames(tokens, mask), positions)[0, :-1]  # (frames - 1, dim)
        c0_logits = model.codebook0_head(h)
        # The depth decoder's input for frame t + 1: [h_t, E_0(c_0), ..., E_{k-2}(c_{k-2})].
        audio = model.audio_embeddings(codes[1:, : k - 1] + model.codebook_offsets[: k - 1])
        depth_in = model.projection(torch.cat([h[:, None], audio], dim=1))
        depth_pos = torch.arange(k, device=device).expand(frames - 1, k)
        dh = model.decoder(depth_in, depth_pos)
        depth_logits = torch.einsum("nid,idv->niv", dh[:, 1:], model.audio_head)
    finally:
        for hook in hooks:
            hook.remove()
    return Outputs(c0_logits.float(), depth_logits.float(), layers)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| (Frobenius, fp32)."""
    return float((value.float() - reference.float()).norm() / reference.float().norm())


def topk_agreement(logits: torch.Tensor, reference: torch.Tensor, k: int) -> float:
    """Mean share of the reference's top-k tokens that are in ``logits``' top-k (k = 1: the argmax)."""
    ours = logits.flatten(0, -2).topk(k, dim=-1).indices
    theirs = reference.flatten(0, -2).topk(k, dim=-1).indices
    shared = (ours[:, :, None] == theirs[:, None, :]).any(-1).sum(-1)
    return float(shared.float().mean() / k)

"""An independent oracle of the reference MisoTTS model, built from torchtune 0.6.1 modules.

It mirrors the structure and inference path of the public reference (``MisoLabsAI/MisoTTS``,
``models.py`` ``Model`` and ``generator.py`` ``Generator.generate``): two torchtune Llama-3.2
decoders with their token embeddings and output layers replaced by ``nn.Identity``, plus the
frame embeddings, projection and heads under the official parameter names. Only greedy decoding
(top-k 1) is reproduced; that is what the parity tests compare.

Differences from the reference, all deliberate and outside the compared math:
- the flavors come from our :class:`~misotts_agents.model.config.Flavor` sizes, with ``attn_dropout=0.0``
  (the reference uses 0.1, which only acts in train mode);
- the causal masks are registered as *non-persistent* buffers, so ``state_dict()`` holds exactly the
  checkpoint keys even after ``setup_caches`` (the reference registers them persistent);
- the exponential race takes an optional ``torch.Generator`` (the reference uses the global RNG;
  with top-k 1 the draw is deterministic anyway unless logits tie).

Tests only: importing torchtune pulls in torchao, datasets, pyarrow, pandas (several seconds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.models import llama3_2
from torchtune.modules import TransformerDecoder

from misotts_agents.model.config import Flavor, ModelConfig

ORACLE_MAX_SEQ_LEN = 2048


def build_torchtune_transformer(flavor: Flavor) -> tuple[TransformerDecoder, int]:
    """A torchtune Llama-3.2 decoder of the given sizes, with embedding and output replaced by Identity."""
    model = llama3_2.llama3_2(
        vocab_size=8,  # unused: tok_embeddings is replaced below
        num_layers=flavor.num_layers,
        num_heads=flavor.num_heads,
        num_kv_heads=flavor.num_kv_heads,
        embed_dim=flavor.embed_dim,
        max_seq_len=ORACLE_MAX_SEQ_LEN,
        intermediate_dim=flavor.intermediate_dim,
        attn_dropout=0.0,
        norm_eps=1e-5,
        rope_base=500_000,
        scale_factor=32,
    )
    dim = model.tok_embeddings.embedding_dim
    model.tok_embeddings = nn.Identity()
    model.output = nn.Identity()
    return model, dim


def causal_mask(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def reference_sample_topk(
    logits: torch.Tensor, topk: int, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The reference's top-k filter and no-sync exponential race, in the logits' dtype -> (b, 1) int32."""
    logits = logits / temperature
    kth = torch.topk(logits, topk).values[..., -1:]
    filtered = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(F.log_softmax(filtered, dim=-1), dim=-1)
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / q, dim=-1, keepdim=True).to(torch.int)


class OracleModel(nn.Module):
    """torchtune-based MisoTTS model with the official state-dict keys; greedy generation only."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.num_codebooks = config.audio_num_codebooks
        self.audio_vocab_size = config.audio_vocab_size
        self.backbone, backbone_dim = build_torchtune_transformer(config.backbone)
        self.decoder, decoder_dim = build_torchtune_transformer(config.decoder)
        self.text_embeddings = nn.Embedding(config.text_vocab_size, backbone_dim)
        self.audio_embeddings = nn.Embedding(config.audio_vocab_size * config.audio_num_codebooks, backbone_dim)
        self.projection = nn.Linear(backbone_dim, decoder_dim, bias=False)
        self.codebook0_head = nn.Linear(backbone_dim, config.audio_vocab_size, bias=False)
        self.audio_head = nn.Parameter(
            torch.empty(config.audio_num_codebooks - 1, decoder_dim, config.audio_vocab_size)
        )
        self.generator: torch.Generator | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _attention_modules(self) -> list[nn.Module]:
        return [layer.attn for layer in (*self.backbone.layers, *self.decoder.layers)]

    def setup_caches(self, batch: int) -> None:
        """Fresh zeroed KV caches for ``batch`` rows (torchtune itself refuses to set up caches twice)."""
        dtype, device = self.dtype, self.device
        for attn in self._attention_modules():
            attn.kv_cache = None
            attn.cache_enabled = False
        # torchtune's KVCache allocates with bare factory calls: place them via the device context.
        with device:
            self.backbone.setup_caches(batch, dtype)
            self.decoder.setup_caches(batch, dtype, decoder_max_seq_len=self.num_codebooks)
        self.register_buffer("backbone_causal_mask", causal_mask(self.backbone.max_seq_len, device), persistent=False)
        self.register_buffer("decoder_causal_mask", causal_mask(self.num_codebooks, device), persistent=False)
        self.generator = torch.Generator(device=device).manual_seed(0)

    def reset_caches(self) -> None:
        self.backbone.reset_caches()
        self.decoder.reset_caches()

    def _embed_audio(self, codebook: int, tokens: torch.Tensor) -> torch.Tensor:
        return self.audio_embeddings(tokens + codebook * self.audio_vocab_size)

    def _embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, s, K+1) -> (b, s, K+1, dim): K audio embeddings (offset per codebook) then the text one."""
        b, s, _ = tokens.shape
        text = self.text_embeddings(tokens[:, :, -1]).unsqueeze(-2)
        offsets = self.audio_vocab_size * torch.arange(self.num_codebooks, device=tokens.device)
        audio = self.audio_embeddings((tokens[:, :, :-1] + offsets).view(-1))
        return torch.cat([audio.reshape(b, s, self.num_codebooks, -1), text], dim=-2)

    def backbone_hidden(self, tokens: torch.Tensor, tokens_mask: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Backbone output (b, s, dim) in the model dtype, filling the backbone cache as generate_frame does."""
        if not self.backbone.caches_are_enabled():
            raise RuntimeError("backbone caches are not set up")
        h = (self._embed_tokens(tokens) * tokens_mask.unsqueeze(-1)).sum(dim=2)
        mask = self.backbone_causal_mask[input_pos, :]
        return self.backbone(h, input_pos=input_pos, mask=mask).to(dtype=self.dtype)

    def backbone_last_hidden(
        self, tokens: torch.Tensor, tokens_mask: torch.Tensor, input_pos: torch.Tensor
    ) -> torch.Tensor:
        return self.backbone_hidden(tokens, tokens_mask, input_pos)[:, -1, :]

    def decode_frame_greedy(self, last_h: torch.Tensor) -> torch.Tensor:
        """Codebook 0 from the backbone head, then codebooks 1..K-1 from the depth decoder (top-k 1)."""
        c0 = reference_sample_topk(self.codebook0_head(last_h), 1, 1.0, self.generator)
        curr_h = torch.cat([last_h.unsqueeze(1), self._embed_audio(0, c0)], dim=1)
        samples = c0.clone()
        curr_pos = torch.arange(curr_h.size(1), device=curr_h.device).unsqueeze(0).repeat(curr_h.size(0), 1)
        self.decoder.reset_caches()  # the depth decoder restarts every frame
        for i in range(1, self.num_codebooks):
            mask = self.decoder_causal_mask[curr_pos, :]
            dh = self.decoder(self.projection(curr_h), input_pos=curr_pos, mask=mask).to(dtype=self.dtype)
            ci = reference_sample_topk(torch.mm(dh[:, -1, :], self.audio_head[i - 1]), 1, 1.0, self.generator)
            curr_h = self._embed_audio(i, ci)
            samples = torch.cat([samples, ci], dim=1)
            curr_pos = curr_pos[:, -1:] + 1
        return samples

    @torch.inference_mode()
    def generate_frame_greedy(
        self, tokens: torch.Tensor, tokens_mask: torch.Tensor, input_pos: torch.Tensor
    ) -> torch.Tensor:
        """The reference ``generate_frame`` with top-k 1 and temperature 1 -> (b, K) int64 codes."""
        return self.decode_frame_greedy(self.backbone_last_hidden(tokens, tokens_mask, input_pos)).long()

    @torch.inference_mode()
    def generate_greedy(self, prompt_tokens: torch.Tensor, prompt_mask: torch.Tensor, max_frames: int) -> torch.Tensor:
        """The reference ``Generator.generate`` loop, greedy, for one prompt (S, K+1) -> (frames, K) codes.

        Stops before an all-zero (EOS) frame; each next input is ``[codes, 0]`` with mask ``[1]*K + [0]``
        at the following position. Needs ``setup_caches(1)``; resets the caches first.
        """
        self.reset_caches()
        device = self.device
        tokens = prompt_tokens.long().to(device).unsqueeze(0)
        mask = prompt_mask.bool().to(device).unsqueeze(0)
        pos = torch.arange(prompt_tokens.size(0), device=device).unsqueeze(0)
        frames = []
        for _ in range(max_frames):
            sample = self.generate_frame_greedy(tokens, mask, pos)
            if torch.all(sample == 0):
                break
            frames.append(sample)
            zero = torch.zeros(1, 1, dtype=torch.long, device=device)
            tokens = torch.cat([sample, zero], dim=1).unsqueeze(1)
            mask = torch.cat([torch.ones_like(sample, dtype=torch.bool), zero.bool()], dim=1).unsqueeze(1)
            pos = pos[:, -1:] + 1
        if not frames:
            return torch.zeros(0, self.num_codebooks, dtype=torch.long, device=device)
        return torch.cat(frames, dim=0)

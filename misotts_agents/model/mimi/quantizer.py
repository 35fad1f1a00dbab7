"""Mimi's split residual vector quantizer (inference only: nearest-centroid encode, lookup decode).

Two independent residual quantizers read the same latent: ``rvq_first`` (1 "semantic" codebook) and
``rvq_rest`` (the 31 acoustic ones). Each projects the 512-d latent to the 256-d codebook space with a
1x1 convolution, quantizes residually, and projects back; the decoded latent is the sum of both.

A codebook's centroids are ``embedding_sum / clamp(cluster_usage, min=1e-5)``, the training-time EMA
buffers kept in the checkpoint (moshi's names, all persistent, so the state dict matches). They are
divided once and cached; the cache is rebuilt whenever those buffers are replaced or modified in place.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from misotts_agents.model.mimi.config import QuantizerSettings

__all__ = ["Codebook", "ResidualQuantizer", "SplitQuantizer"]

_EPSILON = 1e-5
# Names older checkpoints used for the codebook buffers (moshi maps them the same way when loading).
_CODEBOOK_ALIASES = {
    "inited": "_initialized",
    "cluster_size": "cluster_usage",
    "embed_avg": "embedding_sum",
    "embed_sum": "embedding_sum",
}


class Codebook(nn.Module):
    """``bins`` centroids of ``dim`` values, stored as moshi's EMA buffers."""

    def __init__(self, dim: int, bins: int) -> None:
        super().__init__()
        self._initialized: torch.Tensor
        self.cluster_usage: torch.Tensor
        self.embedding_sum: torch.Tensor
        self.register_buffer("_initialized", torch.zeros(1))  # unused at inference; kept for the checkpoint
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))
        self.register_load_state_dict_pre_hook(self._rename_old_keys)

    @staticmethod
    def _rename_old_keys(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        for old, new in _CODEBOOK_ALIASES.items():
            if prefix + old in state and prefix + new not in state:
                state[prefix + new] = state.pop(prefix + old)

    def centroids(self) -> torch.Tensor:
        """(bins, dim), as moshi computes them."""
        return self.embedding_sum / self.cluster_usage.clamp(min=_EPSILON)[:, None]

    def stamp(self) -> tuple[Any, ...]:
        """Changes whenever the centroids may have: another tensor, or an in-place write to one."""
        return tuple((t.data_ptr(), t.device, t.dtype, _version(t)) for t in (self.embedding_sum, self.cluster_usage))


def _version(t: torch.Tensor) -> int:
    # Inference-mode tensors keep no version counter; their identity (data_ptr) is all we can check.
    return -1 if t.is_inference() else t._version


class _VQLayer(nn.Module):
    """One level of the residual stack (``vq.layers.N._codebook`` in the checkpoint)."""

    def __init__(self, dim: int, bins: int) -> None:
        super().__init__()
        self._codebook = Codebook(dim, bins)


class _VQStack(nn.Module):
    def __init__(self, dim: int, bins: int, levels: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_VQLayer(dim, bins) for _ in range(levels)])


class ResidualQuantizer(nn.Module):
    """Projection in, ``levels`` residual codebooks, projection out."""

    def __init__(self, settings: QuantizerSettings, levels: int) -> None:
        super().__init__()
        self.levels = levels
        self.input_proj = nn.Conv1d(settings.input_dimension, settings.dimension, 1, bias=False)
        self.output_proj = nn.Conv1d(settings.dimension, settings.output_dimension, 1, bias=False)
        self.vq = _VQStack(settings.dimension, settings.bins, levels)

    @property
    def codebooks(self) -> list[Codebook]:
        return [layer._codebook for layer in self.vq.layers if isinstance(layer, _VQLayer)]

    def encode(self, latent: torch.Tensor, centroids: torch.Tensor, levels: int) -> torch.Tensor:
        """(B, C, F) latent -> (B, levels, F) codes with the first ``levels`` codebooks.

        Nearest centroid by ``torch.cdist`` on (B * F, D) rows, exactly the call moshi makes: cdist
        switches to a matrix-product formula above 25 rows or centroids (always, with 2048 bins), which
        can order near-ties differently from a direct distance, so the same call keeps the same codes.
        """
        b, _, frames = latent.shape
        residual = self.input_proj(latent)
        codes = []
        for level in range(levels):
            table = centroids[level]
            rows = residual.transpose(1, 2).reshape(b * frames, -1)
            index = torch.cdist(rows[None], table[None], p=2)[0].argmin(dim=-1).view(b, frames)
            residual = residual - F.embedding(index, table).transpose(1, 2)
            codes.append(index)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """(B, K, F) codes -> (B, C, F); the centroids summed level by level in order, as moshi does."""
        total = torch.zeros((), device=codes.device, dtype=centroids.dtype)
        for level in range(codes.shape[1]):
            total = total + F.embedding(codes[:, level], centroids[level])
        return self.output_proj(total.transpose(1, 2))


class SplitQuantizer(nn.Module):
    """``rvq_first`` (the semantic codebooks) and ``rvq_rest`` (acoustic), both on the same latent."""

    def __init__(self, settings: QuantizerSettings) -> None:
        super().__init__()
        self.settings = settings
        self.semantic = settings.n_q_semantic
        self.rvq_first = ResidualQuantizer(settings, settings.n_q_semantic)
        self.rvq_rest = ResidualQuantizer(settings, settings.n_q - settings.n_q_semantic)
        self._table: torch.Tensor | None = None  # (n_q, bins, dim) centroids, cached
        self._table_stamp: tuple[Any, ...] = ()

    def centroids(self) -> torch.Tensor:
        """All codebooks' centroids, (n_q, bins, dim): computed once, again only after the buffers change."""
        books = self.rvq_first.codebooks + self.rvq_rest.codebooks
        stamp = tuple(book.stamp() for book in books)
        if self._table is None or stamp != self._table_stamp:
            with torch.no_grad():
                self._table = torch.stack([book.centroids() for book in books])
            self._table_stamp = stamp
        return self._table

    def encode(self, latent: torch.Tensor, num_codebooks: int) -> torch.Tensor:
        """(B, C, F) latent -> (B, num_codebooks, F) int64 codes."""
        table = self.centroids()
        codes = self.rvq_first.encode(latent, table[: self.semantic], self.semantic)
        if num_codebooks > self.semantic:
            rest = self.rvq_rest.encode(latent, table[self.semantic :], num_codebooks - self.semantic)
            codes = torch.cat([codes, rest], dim=1)
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, K, F) codes -> (B, C, F) latent (whole clip, moshi's order of operations)."""
        table = self.centroids()
        latent = self.rvq_first.decode(codes[:, : self.semantic], table[: self.semantic])
        if codes.shape[1] > self.semantic:
            latent = latent + self.rvq_rest.decode(codes[:, self.semantic :], table[self.semantic :])
        return latent

    def decode_frame(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, K) codes of one frame -> (B, C, 1): one lookup for all codebooks, a sum, two products.

        Same values as :meth:`decode` up to float rounding (the sums run in another order)."""
        k = codes.shape[1]
        table = self.centroids()
        offsets = torch.arange(k, device=codes.device) * self.settings.bins  # row of codebook j's entry 0
        vectors = F.embedding(codes + offsets, table.flatten(0, 1))  # (B, K, D)
        first = self.rvq_first.output_proj.weight[:, :, 0]
        latent = vectors[:, : self.semantic].sum(dim=1) @ first.t()
        if k > self.semantic:
            rest = self.rvq_rest.output_proj.weight[:, :, 0]
            latent = latent + vectors[:, self.semantic :].sum(dim=1) @ rest.t()
        return latent[:, :, None]

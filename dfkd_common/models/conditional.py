"""Label-conditioned generators: NAYER's text-embedding input with a re-initialised "noisy layer".

NAYER (Tran et al., CVPR 2024) moves the randomness of a generator from its input to a layer: the input is a
fixed text embedding of the target class, normalised by BatchNorm1d, then passed through a *noisy layer*, a
plain Linear whose weights are re-drawn before every synthesis batch. The embedding carries the inter-class
structure (so a few generator steps suffice); the fresh noisy layer makes every batch different (so the bank
does not collapse to one image per class). A batch is split into chunks of ``chunk`` consecutive samples with
one noisy layer each, so samples of the same class within a batch also differ.

:class:`LabelGenerator` = :class:`NoisyEmbeddingInput` followed by any body that maps a vector to images (the
DCGAN body for NAYER, the teacher-mirroring :class:`~dfkd_common.models.coupled.CoupledGenerator` for CPNet).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class NoisyEmbeddingInput(nn.Module):
    """Class embedding table (fixed buffer) -> BatchNorm1d -> per-chunk noisy Linear layers."""

    def __init__(self, table: torch.Tensor, max_batch: int, chunk: int, out_dim: int | None = None) -> None:
        super().__init__()
        if table.dim() != 2:
            raise ValueError("embedding table must be (num_classes, dim)")
        dim = int(table.shape[1])
        self.chunk = max(1, int(chunk))
        self.out_dim = int(out_dim or dim)
        self.register_buffer("table", table.detach().float().clone())
        self.norm = nn.BatchNorm1d(dim)
        n_layers = max(1, math.ceil(int(max_batch) / self.chunk))
        self.noisy = nn.ModuleList(nn.Linear(dim, self.out_dim) for _ in range(n_layers))

    @torch.no_grad()
    def reinit_noise(self) -> None:
        """Draw new noisy-layer weights N(0, 1), bias 0, as NAYER's released code (global torch RNG, which the
        stages seed and checkpoint).

        The scale matters: Adam's steps have a fixed size whatever the weights' scale, so with PyTorch's default
        init (std ~0.03 for a 384-d input) the generator's lr_g moves these weights ~35x further relative to
        their draw, and the draw, the layer's only source of diversity, is overwritten within a round.
        """
        for layer in self.noisy:
            layer.weight.normal_(0.0, 1.0)
            layer.bias.zero_()

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.table[y])
        n = h.shape[0]
        if n > self.chunk * len(self.noisy):
            raise ValueError(f"batch of {n} exceeds the {len(self.noisy)} noisy layers of {self.chunk} samples")
        parts = [layer(h[i * self.chunk:(i + 1) * self.chunk])
                 for i, layer in enumerate(self.noisy) if i * self.chunk < n]
        return torch.cat(parts, 0)


class LabelGenerator(nn.Module):
    """Labels -> images: :class:`NoisyEmbeddingInput` then ``body`` (extra forward kwargs go to the body)."""

    def __init__(self, inputs: NoisyEmbeddingInput, body: nn.Module) -> None:
        super().__init__()
        self.inputs = inputs
        self.body = body

    def reinit_noise(self) -> None:
        self.inputs.reinit_noise()

    def forward(self, y: torch.Tensor, **kwargs: Any) -> Any:
        return self.body(self.inputs(y), **kwargs)

"""RGAL's relation machinery (Liang et al., IJCV 2024): triplets by distance-weighted sampling, and the hinge.

Written once and used by the synthesis term ``triplet`` (:mod:`dfkd_common.synthesis.losses`) and the student
terms ``striplet`` and ``cd`` (:mod:`dfkd_common.student.relation`).

**Sampling** (:func:`sample_triplets`). Every ordered pair (i, j), i != j, with the same label is an (anchor,
positive); one negative per pair is drawn from the anchor's row of weights computed on a *sampler embedding*
(L2-normalised logits, dimension n): distance-weighted sampling (Wu et al., 2017),
``log w(d) = (2 - n) log d - ((n - 3) / 2) log(1 - d^2 / 4)``, the inverse of the density of distances between
points on the unit sphere, so negatives come uniformly from all distances rather than mostly from the far ones.

* ``window=(lo, hi)`` (synthesis, the released code's ``balanced_sampling``): only negatives with lo < d < hi
  (the "focal" window 0.5-1.0); weights are normalised after subtracting the row's maximum *over the window*.
  The released code takes the maximum over the whole row, which underflows every weight to 0 with 100 classes
  (n = 100: the exponent spans hundreds); working in log space over the window cannot underflow.
* ``clamp=(lo, hi)`` (the student's plain sampling): d clamped to >= lo, negatives kept for d < hi.
* A row with no negative inside its window or cutoff falls back to uniform over every other-label sample; a batch
  without a positive pair, or without any other-label sample, yields no triplet.

**Hinge** (:func:`triplet_hinge`): per triplet and feature, ``max(||a - p|| - ||a - n|| + margin, 0)`` (or with
p and n exchanged: ``swap``), summed over the features given (stages), averaged over triplets; 0 with no triplet,
never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _log_weights(d: torch.Tensor, n: int) -> torch.Tensor:
    """log of the distance-weighted sampling weight for distances ``d`` in (0, 2) on the unit sphere in R^n."""
    d = d.clamp(1e-4, 2 - 1e-4)
    return (2.0 - n) * torch.log(d) - ((n - 3) / 2.0) * torch.log((1.0 - d.pow(2) / 4.0).clamp_min(1e-8))


@torch.no_grad()
def sample_triplets(
    sampler: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
    window: tuple[float, float] | None = None, clamp: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchor, positive, negative) row indices, one negative per same-label ordered pair (module docstring).

    ``sampler``: (B, n) embedding to measure distances in (normalised here); ``labels``: (B,). Exactly one of
    ``window`` (focal window, synthesis) or ``clamp`` (plain, student) is used; neither = the whole row.
    Drawn on the CPU with ``generator`` so a run repeats.
    """
    empty = torch.zeros(0, dtype=torch.long)
    b = int(labels.shape[0])
    if b < 2:
        return empty, empty, empty
    emb = F.normalize(sampler.detach().float().cpu(), dim=1)
    labels = labels.detach().cpu()
    same = labels[:, None] == labels[None, :]
    pos_mask = same & ~torch.eye(b, dtype=torch.bool)
    anchors, positives = pos_mask.nonzero(as_tuple=True)
    other = ~same
    if len(anchors) == 0 or not bool(other.any()):
        return empty, empty, empty
    d = torch.cdist(emb, emb)
    n = emb.shape[1]
    if clamp is not None:
        d = d.clamp_min(clamp[0])
        allowed = other & (d < clamp[1])
    elif window is not None:
        allowed = other & (d > window[0]) & (d < window[1])
    else:
        allowed = other
    logw = _log_weights(d, n)
    neg_inf = torch.full_like(logw, float("-inf"))
    logw = torch.where(allowed, logw, neg_inf)
    has = allowed.any(1, keepdim=True)
    logw = logw - torch.where(has, logw.amax(1, keepdim=True), torch.zeros_like(has, dtype=logw.dtype))
    fallback = torch.where(other, torch.zeros_like(logw), neg_inf)  # uniform over every other-label sample
    weights = torch.where(has, logw, fallback).exp()
    # one independent draw per (anchor, positive) pair: per anchor as many draws (with replacement) as it has
    # positives, from its row only, instead of materialising a row per pair (26k x 512 for 2 x 256 views)
    per_anchor = pos_mask.sum(1)
    start = torch.cumsum(per_anchor, 0) - per_anchor  # pairs are ordered by anchor (nonzero is row-major)
    rank = torch.arange(len(anchors)) - start[anchors]  # a pair's place among its anchor's positives
    usable = (per_anchor > 0) & (weights.sum(1) > 0)
    keep = usable[anchors]
    anchors, positives, rank = anchors[keep], positives[keep], rank[keep]
    if len(anchors) == 0:
        return empty, empty, empty
    rows = usable.nonzero(as_tuple=True)[0]
    draws = torch.multinomial(weights[rows], int(per_anchor.max()), replacement=True, generator=generator)
    slot = torch.full((b,), -1, dtype=torch.long)
    slot[rows] = torch.arange(len(rows))
    negatives = draws[slot[anchors], rank]
    return anchors, positives, negatives


def triplet_hinge(features: list[torch.Tensor], anchors: torch.Tensor, positives: torch.Tensor,
                  negatives: torch.Tensor, margin: float = 0.2, swap: bool = False) -> torch.Tensor:
    """Mean over triplets of the hinge summed over ``features`` (each (B, D), compared as given)."""
    ref = features[0]
    if len(anchors) == 0:
        return ref.sum() * 0.0  # keeps the graph and dtype; a clean 0, never NaN
    dev = ref.device
    # rows gathered by index_select, whose backward (index_add) sums in a fixed order on the CPU; the backward of
    # advanced indexing (f[idx]: index_put with accumulate) made two identical runs differ in the last bits
    idx = [i.to(dev) for i in (anchors, positives, negatives)]
    total = ref.new_zeros(len(anchors), dtype=torch.float32)
    for f in features:
        fa, fp, fn = (f.float().index_select(0, i) for i in idx)
        d_ap = (fa - fp).pow(2).sum(1).add(1e-12).sqrt()
        d_an = (fa - fn).pow(2).sum(1).add(1e-12).sqrt()
        total = total + (F.relu(d_an - d_ap + margin) if swap else F.relu(d_ap - d_an + margin))
    return total.mean()


def pooled(feature: torch.Tensor) -> torch.Tensor:
    """A stage map (B, C, H, W) or a vector (B, D), global-average-pooled and L2-normalised to (B, C)."""
    f = feature.float()
    if f.dim() == 4:
        f = f.mean((2, 3))
    return F.normalize(f.flatten(1), dim=1)

"""CPNet's loss terms and its CutMix, registered in :data:`~dfkd_common.synthesis.losses.TERMS`.

* ``xn`` (feature coupling): L_xn = sum_i MSE(g_i, stopgrad(phi_i~)). g_i is the coupled generator's tensor at
  stage i, phi_i the teacher's input to the BN at the mirrored stage, computed on the same generated batch and
  *renormalised*: standardised per channel with its own batch statistics, then rescaled to the BN's running
  mean/variance. The renormalisation keeps the target's spatial pattern (what the teacher sees of this image)
  while giving it the statistics of real data, so the generator's intermediate maps are pulled toward "the
  teacher's features of a real image like this one". Context: ``ctx.coupling`` = list of
  ``(g_i, phi_i, bn_i)``.
* ``align`` (inverse-classifier constraint): with the teacher's last Linear (W, b), C classes and label smoothing
  eps, the logits of the smoothed one-hot target are ``onehot(y) * delta + k`` for any constant k, with
  delta = log((1 - eps)(C - 1) / eps). Inverting the classifier with W+ = pinv(W^T) (SVD, singular values
  clamped at ``min_singular`` so near-null directions do not explode) maps labels to features:
  a = f_T - (onehot(y) * delta - b) W+ is the teacher feature's offset from the label's feature, and c = 1 W+ is
  the feature direction that shifts every logit equally (the free constant k). L_align = mean |cos(a, c)|.
  It is 1 when the offset lies along c, i.e. when the teacher outputs exactly the smoothed label distribution,
  and 0 when the offset is orthogonal to c. CPNet adds it to the adversarial term after warm-up: minimising it
  keeps generated features away from the single "ideal" point of each class, converting the classification of
  a sample into a distance between features and spreading the samples (the paper's diversity argument). Like
  ``adv`` it is 0 while no student is given (warm-up, offline synthesis). Context:
  ``ctx.inverse_classifier`` (an :class:`InverseClassifier`), ``ctx.t_feat``, ``ctx.y``.
* :class:`CutMix`: pastes a random box of another sample of the batch (probability p per batch) into every
  image; the one-hot term (``oh``) then becomes the lambda-mixed cross-entropy through ``ctx.cutmix``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_common.synthesis.losses import Context, term


def channel_stats(phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, var) of a feature map, shaped (1, C, 1, 1)."""
    var, mean = torch.var_mean(phi.float(), dim=(0, 2, 3), keepdim=True, correction=0)
    return mean, var


def renormalise(phi: torch.Tensor, bn: nn.BatchNorm2d,
                stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Standardise ``phi`` per channel by ``stats`` (default: its own batch statistics; CPNet's released code
    blends them with their EMA over earlier rounds), rescale to ``bn``'s running mean/var."""
    phi = phi.float()
    mean, var = stats if stats is not None else channel_stats(phi)
    rm, rv = bn.running_mean, bn.running_var
    assert rm is not None and rv is not None
    z = (phi - mean) / torch.sqrt(var + bn.eps)
    return z * torch.sqrt(rv.float().view(1, -1, 1, 1) + bn.eps) + rm.float().view(1, -1, 1, 1)


def coupling_loss(pairs: list[tuple[Any, ...]]) -> torch.Tensor:
    """sum_i MSE(g_i, stopgrad(renormalise(phi_i, bn_i[, stats_i]))); a pair is (g, phi, bn) or (g, phi, bn,
    (mean, var)) with the statistics to standardise phi by."""
    total = pairs[0][0].new_zeros((), dtype=torch.float32)
    for g, phi, bn, *stats in pairs:
        with torch.no_grad():
            target = renormalise(phi.detach(), bn, stats[0] if stats else None)
        total = total + F.mse_loss(g.float(), target)
    return total


@term("xn", needs=("coupling",))
def xn_term(ctx: Context, opts: Any) -> torch.Tensor:
    """CPNet feature coupling between generator stages and renormalised teacher BN inputs."""
    pairs = ctx.coupling
    if not pairs:
        raise ValueError("xn term needs ctx.coupling (a coupled generator)")
    return coupling_loss(pairs)


class InverseClassifier:
    """Precomputed inverse of a Linear classifier (see module docstring); ``loss(f, y)`` = mean |cos(a, c)|."""

    def __init__(self, linear: nn.Linear, eps: float = 0.1, min_singular: float = 0.1) -> None:
        if not 0 < eps < 1:
            raise ValueError("label smoothing eps must be in (0, 1)")
        w = linear.weight.detach().float()  # (C, D)
        b = linear.bias.detach().float() if linear.bias is not None else w.new_zeros(w.shape[0])
        self.num_classes = int(w.shape[0])
        self.delta = math.log((1 - eps) * (self.num_classes - 1) / eps)
        u, s, vh = torch.linalg.svd(w.t(), full_matrices=False)  # W^T = U S V^T, (D, C)
        self.pinv = vh.t() @ torch.diag(1.0 / s.clamp_min(min_singular)) @ u.t()  # (C, D)
        self.bias = b
        self.c = self.pinv.sum(0)  # 1 W+, (D,)

    def to(self, device: torch.device) -> InverseClassifier:
        self.pinv, self.bias, self.c = self.pinv.to(device), self.bias.to(device), self.c.to(device)
        return self

    def label_features(self, y: torch.Tensor) -> torch.Tensor:
        """(onehot(y) * delta - b) W+: the feature whose logits are the smoothed label's (up to a constant)."""
        onehot = F.one_hot(y, self.num_classes).float() * self.delta
        return (onehot - self.bias) @ self.pinv

    def loss(self, feat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = feat.float().flatten(1) - self.label_features(y)
        return F.cosine_similarity(a, self.c.expand_as(a), dim=1).abs().mean()


@dataclass(frozen=True)
class AlignOptions:
    label_smoothing: float = 0.1  # eps of the smoothed label the inverse classifier maps to a feature
    min_singular: float = 0.1  # singular values of the classifier below this are clamped before inverting


@term("align", needs=("s_logits", "t_feat", "inverse_classifier"), options=AlignOptions)
def align_term(ctx: Context, opts: Any) -> torch.Tensor:
    """CPNet inverse-classifier constraint; active with the adversarial term (a student is given).

    Its options (label smoothing eps, the singular-value clamp) shape the inverse the synthesizer precomputes
    once (:class:`InverseClassifier`), which reaches the term as ``ctx.inverse_classifier``.
    """
    if ctx.s_logits is None:
        return ctx.t_logits.new_zeros((), dtype=torch.float32)
    inv = ctx.inverse_classifier
    if inv is None or ctx.t_feat is None or ctx.y is None:
        raise ValueError("align term needs ctx.inverse_classifier, teacher features and targets")
    return inv.loss(ctx.t_feat, ctx.y)


class CutMix(nn.Module):
    """CutMix; after a call ``last`` is ``(perm, lam)`` or None (not applied).

    ``mode: sample`` (the released CPNet code, kornia's RandomCutMixV2 semantics): each sample, with probability
    ``p``, gets its own box and lambda, pasted from its partner ``perm[i]``; ``lam`` is then a tensor, 1 for
    samples left alone. ``mode: batch`` (dfkd before 0.3): one box and lambda for the whole batch with
    probability ``p``. ``lam`` is the fraction of each image that is still its own (after clipping the box to
    the image). Randomness comes from ``generator`` (a CPU torch.Generator) so runs are reproducible.
    """

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None, mode: str = "sample") -> None:
        super().__init__()
        if mode not in ("sample", "batch"):
            raise ValueError(f"cutmix mode must be sample or batch, got {mode!r}")
        self.p = float(p)
        self.generator = generator
        self.mode = mode
        self.last: tuple[torch.Tensor, Any] | None = None

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = None
        if self.p <= 0 or x.shape[0] < 2:
            return x
        if self.mode == "sample":
            return self._per_sample(x)
        if float(self._rand(1)) >= self.p:
            return x
        n, _, h, w = x.shape
        lam = float(self._rand(1))
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(self._rand(1) * h), int(self._rand(1) * w)
        y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        if y2 <= y1 or x2 <= x1:
            return x
        perm = torch.randperm(n, generator=self.generator).to(x.device)
        mask = torch.zeros(1, 1, h, w, device=x.device, dtype=x.dtype)
        mask[..., y1:y2, x1:x2] = 1
        self.last = (perm, 1.0 - (y2 - y1) * (x2 - x1) / (h * w))
        return x * (1 - mask) + x[perm] * mask

    def _per_sample(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        applied = self._rand(n) < self.p
        lam0 = self._rand(n)
        cut = torch.sqrt(1.0 - lam0)
        ch, cw = (h * cut).long(), (w * cut).long()
        cy, cx = (self._rand(n) * h).long(), (self._rand(n) * w).long()
        y1, y2 = (cy - ch // 2).clamp(0, h), (cy + ch // 2).clamp(0, h)
        x1, x2 = (cx - cw // 2).clamp(0, w), (cx + cw // 2).clamp(0, w)
        perm = torch.randperm(n, generator=self.generator)
        rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
        box = ((rows >= y1.view(n, 1, 1)) & (rows < y2.view(n, 1, 1)) & (cols >= x1.view(n, 1, 1))
               & (cols < x2.view(n, 1, 1)) & applied.view(n, 1, 1))
        lam = 1.0 - box.flatten(1).float().mean(1)
        if not bool(box.any()):
            return x
        mask = box.unsqueeze(1).to(x.device, x.dtype)
        perm = perm.to(x.device)
        self.last = (perm, lam.to(x.device))
        return x * (1 - mask) + x[perm] * mask

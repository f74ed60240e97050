"""Reusable loss terms. Methods are weighted sums of these, so each term is written and tested once.

Every term takes a :class:`Context` (what one synthesis step computed) and returns a scalar to *minimise*.
Terms are registered by name in :data:`TERMS`; a method's params give each a weight (``weights: {bn: 10,
oh: 0.5}``), and a term with weight 0 is never computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dfkd_common.functional import kd_loss, kl_div
from dfkd_common.models.hooks import BNStats
from dfkd_common.registry import Registry


@dataclass
class Context:
    """Tensors of one synthesis step. ``x`` images in [0, 1]; ``t_logits`` teacher logits on aug(x)."""

    x: torch.Tensor
    t_logits: torch.Tensor
    y: torch.Tensor | None = None
    s_logits: torch.Tensor | None = None
    t_feat: torch.Tensor | None = None  # teacher penultimate features
    bn: BNStats | None = None
    extra: dict[str, Any] = field(default_factory=dict)


__all__ = ["TERMS", "Context", "kd_loss", "kl_div", "weighted_sum"]

Term = Callable[[Context], torch.Tensor]
TERMS: Registry[Term] = Registry("loss term")


@TERMS.register("bn")
def bn_term(ctx: Context) -> torch.Tensor:
    """DeepInversion's feature-statistics prior, summed over the teacher's BatchNorm2d layers."""
    if ctx.bn is None:
        raise ValueError("bn term needs BN hooks on the teacher")
    return ctx.bn.loss().to(ctx.x.device)


@TERMS.register("oh")
def onehot_term(ctx: Context) -> torch.Tensor:
    """CE(T(x), y): the teacher must be confident about the target class (argmax T when y is None).

    When the batch was CutMix-ed (``ctx.extra["cutmix"] = (perm, lam)``, CPNet) it is the lambda-mixed
    lam * CE(T(x), y) + (1 - lam) * CE(T(x), y[perm]).
    """
    y = ctx.y if ctx.y is not None else ctx.t_logits.argmax(1)
    mix = ctx.extra.get("cutmix")
    if mix is not None:
        perm, lam = mix
        t = ctx.t_logits.float()
        return lam * F.cross_entropy(t, y) + (1 - lam) * F.cross_entropy(t, y[perm])
    return F.cross_entropy(ctx.t_logits.float(), y)


@TERMS.register("ie")
def entropy_balance_term(ctx: Context) -> torch.Tensor:
    """DAFL information entropy: sum_k pbar_k log pbar_k (minimised = batch classes balanced)."""
    pbar = F.softmax(ctx.t_logits.float(), dim=1).mean(0)
    return (pbar * torch.log(pbar + 1e-8)).sum()


@TERMS.register("act")
def activation_term(ctx: Context) -> torch.Tensor:
    """DAFL activation: -mean |f_T(x)| over penultimate features (real data excites the features)."""
    if ctx.t_feat is None:
        raise ValueError("act term needs the teacher's penultimate features")
    return -ctx.t_feat.float().abs().mean()


@TERMS.register("tv")
def total_variation_term(ctx: Context) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (image smoothness prior of DeepInversion)."""
    x = ctx.x.float()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


@TERMS.register("l2")
def l2_term(ctx: Context) -> torch.Tensor:
    """Mean squared pixel norm: keeps pixels from saturating."""
    return ctx.x.float().pow(2).mean()


@TERMS.register("adv")
def adversarial_term(ctx: Context) -> torch.Tensor:
    """-mean[KL(p_T || p_S) * 1(argmax S == argmax T)]: samples the student agrees on but imitates badly.

    ``ctx.extra["adv_kl_order"] == "student_teacher"`` gives CPNet code's KL(p_S || p_T).
    """
    if ctx.s_logits is None:
        return ctx.t_logits.new_zeros(())
    t, s = ctx.t_logits.float(), ctx.s_logits.float()
    agree = (s.argmax(1) == t.argmax(1)).float()
    if ctx.extra.get("adv_kl_order", "teacher_student") == "student_teacher":
        kl = kl_div(s, t, reduce=False)
    else:
        kl = kl_div(t, s, reduce=False)
    return -(kl * agree).mean()


def weighted_sum(weights: dict[str, float], ctx: Context) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of ``weight * term`` over terms with a non-zero weight, plus each term's value for logging."""
    total = ctx.x.new_zeros((), dtype=torch.float32)
    logs: dict[str, float] = {}
    for name, w in weights.items():
        if not w:
            continue
        value = TERMS.get(name)(ctx)
        logs[name] = float(value.detach())
        total = total + w * value
    return total, logs

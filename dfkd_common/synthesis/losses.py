"""Reusable synthesis loss terms. Methods are weighted sums of these, so each term is written and tested once.

Every term takes a :class:`Context` (what one synthesis step computed) and its options, and returns a scalar to
*minimise*. Terms are registered by name in :data:`TERMS` with what they **need** from the step and the
**options** they own (a frozen dataclass: defaults and types, :mod:`dfkd_common.config`): a method's params give
each a weight (``weights: {bn: 10, oh: 0.5}``) and, where it has options, those (``terms: {adv: {kl_order:
student_teacher}}``, parsed into the term's options when the method is built). A
term with weight 0 is never computed; the context computes what the active terms need (the student's forward
only when one of them needs ``s_logits``), and a synthesizer refuses, when it is built, a term whose needs it
cannot serve (CPNet's ``xn`` on Fast, which has no teacher-coupled generator).

Needs: ``t_logits`` (always there), ``s_logits`` (online, after warm-up; terms return 0 without a student),
``t_feat`` (the teacher's penultimate features), ``bn`` (the teacher's BN statistics hooks), ``stages`` (stage maps
of a network: a term that needs them says which, through its ``stages_of``), and what a synthesizer adds to the
:class:`Context`'s typed fields (CPNet: ``coupling``, ``inverse_classifier``, ``cutmix``; CSD: ``rotation``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from dfkd_common.config import parse
from dfkd_common.functional import kd_loss, kl_div
from dfkd_common.models.hooks import BNStats
from dfkd_common.registry import Registry


@dataclass
class Context:
    """Tensors of one synthesis step. ``x`` images in [0, 1]; ``t_logits`` teacher logits on aug(x).

    Every field is typed; the base synthesizer fills the first ones, a method the ones it ``provides``.
    """

    x: torch.Tensor
    t_logits: torch.Tensor
    y: torch.Tensor | None = None
    s_logits: torch.Tensor | None = None
    t_feat: torch.Tensor | None = None  # teacher penultimate features
    bn: BNStats | None = None
    xa: torch.Tensor | None = None  # the augmented batch the networks saw
    stages: list[torch.Tensor] | None = None  # the stage maps a stage-reading term asked for (``stages_of``)
    gen: torch.Generator | None = None  # the synthesizer's generator: terms that draw (triplets) draw from it
    cutmix: tuple[torch.Tensor, Any] | None = None  # CPNet: (permutation, lambda per sample or one)
    inverse_classifier: Any = None  # CPNet: the teacher classifier's precomputed inverse
    coupling: list[tuple[Any, ...]] | None = None  # CPNet: (generator stage, teacher BN input, BN, stats) pairs
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None  # CSD: the rotation head's logits and labels


@dataclass(frozen=True)
class StageRequest:
    """Which stage maps a term reads: of the ``student`` or the ``teacher``, by index into its stages."""

    target: str
    indices: tuple[int, ...]


@dataclass(frozen=True)
class NoOptions:
    """The options of a term that has none."""


@dataclass(frozen=True)
class Term:
    """A registered term: ``fn(ctx, options)``, what it needs, its options (a config dataclass), and (a term that
    needs ``stages``) which stage maps its options ask for."""

    fn: Callable[[Context, Any], torch.Tensor]
    needs: frozenset[str]
    Options: type = NoOptions
    stages_of: Callable[[Any], StageRequest] | None = None

    def options(self, given: Mapping[str, Any] | None = None, where: str = "") -> Any:
        """The term's options from ``terms.<name>`` of a params section (checked: one error line)."""
        return parse(self.Options, given, where or "terms")

    def __call__(self, ctx: Context, options: Any = None) -> torch.Tensor:
        """The term on ``ctx``; ``options`` parsed already (a method does it once) or a mapping (tests, tools)."""
        if not isinstance(options, self.Options):
            options = self.options(options)
        return self.fn(ctx, options)


__all__ = ["TERMS", "Context", "StageRequest", "Term", "kd_loss", "kl_div", "term", "weighted_sum"]

TERMS: Registry[Term] = Registry("loss term")


def term(name: str, needs: tuple[str, ...] = (), options: type = NoOptions,
         stages_of: Callable[[Any], StageRequest] | None = None) -> Callable[[Callable[..., torch.Tensor]], Term]:
    """Register ``fn(ctx, options)`` as the synthesis term ``name`` (``options``: its options' dataclass;
    ``stages_of``: for a term that needs ``stages``, the maps its options ask for)."""

    def deco(fn: Callable[[Context, Any], torch.Tensor]) -> Term:
        return TERMS.register(name)(Term(fn, frozenset(("t_logits", *needs)), options, stages_of))

    return deco


@dataclass(frozen=True)
class BNOptions:
    first: float = 1.0  # the first BN layer's weight in the sum (DeepInversion's ImageNet first_bn_multiplier: 10)


@term("bn", needs=("bn",), options=BNOptions)
def bn_term(ctx: Context, opts: BNOptions) -> torch.Tensor:
    """DeepInversion's feature-statistics prior, summed over the teacher's BatchNorm2d layers (the first one
    ``first`` times: at 224 px the stem's statistics are what keeps low-level image statistics natural)."""
    if ctx.bn is None:
        raise ValueError("bn term needs BN hooks on the teacher")
    return ctx.bn.loss(opts.first).to(ctx.x.device)


@term("oh")
def onehot_term(ctx: Context, opts: Any) -> torch.Tensor:
    """CE(T(x), y): the teacher must be confident about the target class (argmax T when y is None).

    When the batch was CutMix-ed (``ctx.cutmix = (perm, lam)``, CPNet; ``lam`` a number or one per
    sample) it is the lambda-mixed mean of lam * CE(T(x), y) + (1 - lam) * CE(T(x), y[perm]).
    """
    y = ctx.y if ctx.y is not None else ctx.t_logits.argmax(1)
    mix = ctx.cutmix
    if mix is not None:
        perm, lam = mix
        t = ctx.t_logits.float()
        own = F.cross_entropy(t, y, reduction="none")
        other = F.cross_entropy(t, y[perm], reduction="none")
        return (lam * own + (1 - lam) * other).mean()
    return F.cross_entropy(ctx.t_logits.float(), y)


@dataclass(frozen=True)
class EntropyOptions:
    log10: bool = False  # DAFL's released code: the entropy in log10, 2.3x weaker at the same weight


@term("ie", options=EntropyOptions)
def entropy_balance_term(ctx: Context, opts: EntropyOptions) -> torch.Tensor:
    """DAFL information entropy: sum_k pbar_k log pbar_k (minimised = batch classes balanced).

    ``pbar`` is the teacher's prediction averaged over the batch, and for per-pixel logits (N, K, H, W) over
    every pixel as well: a segmentation teacher's balance is its pixels' (the class-balance term DAFL's
    segmentation baseline needs). Natural log by default; ``log10: true`` is DAFL's released code, whose term
    is ln 10 = 2.3x weaker at the same weight.
    """
    probs = F.softmax(ctx.t_logits.float(), dim=1)
    pbar = probs.movedim(1, -1).reshape(-1, probs.shape[1]).mean(0)
    ent = (pbar * torch.log(pbar + 1e-8)).sum()
    return ent / math.log(10.0) if opts.log10 else ent


@term("act", needs=("t_feat",))
def activation_term(ctx: Context, opts: Any) -> torch.Tensor:
    """DAFL activation: -mean |f_T(x)| over penultimate features (real data excites the features)."""
    if ctx.t_feat is None:
        raise ValueError("act term needs the teacher's penultimate features")
    return -ctx.t_feat.float().abs().mean()


@term("tv")
def total_variation_term(ctx: Context, opts: Any) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (image smoothness prior of DeepInversion)."""
    x = ctx.x.float()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


@term("l2")
def l2_term(ctx: Context, opts: Any) -> torch.Tensor:
    """Mean squared pixel norm: keeps pixels from saturating."""
    return ctx.x.float().pow(2).mean()


@dataclass(frozen=True)
class AdversarialOptions:
    kl_order: Literal["teacher_student", "student_teacher"] = "teacher_student"


@term("adv", needs=("s_logits",), options=AdversarialOptions)
def adversarial_term(ctx: Context, opts: AdversarialOptions) -> torch.Tensor:
    """-mean[KL(p_T || p_S) * 1(argmax S == argmax T)]: samples the student agrees on but imitates badly.

    Option ``kl_order``: ``teacher_student`` (NAYER's and CPNet's paper) or ``student_teacher`` (CPNet's released
    code: KL(p_S || p_T)).
    """
    if ctx.s_logits is None:
        return ctx.t_logits.new_zeros(())
    t, s = ctx.t_logits.float(), ctx.s_logits.float()
    agree = (s.argmax(1) == t.argmax(1)).float()
    if opts.kl_order == "student_teacher":
        kl = kl_div(s, t, reduce=False)
    else:
        kl = kl_div(t, s, reduce=False)
    return -(kl * agree).mean()


@dataclass(frozen=True)
class TripletOptions:
    target: Literal["student", "teacher"] = "student"  # whose stage maps
    stages: tuple[int, ...] = (-1,)  # indices into its stages (-1: the last)
    margin: float = 0.2
    window: tuple[float, float] = (0.5, 1.0)  # the focal window of distance-weighted negative sampling
    mode: Literal["swap", "code"] = "swap"


def triplet_stages(opts: TripletOptions) -> StageRequest:
    """The triplet term reads the maps of the stages its ``stages`` option indexes, of its ``target``."""
    return StageRequest(opts.target, tuple(int(i) for i in opts.stages))


@term("triplet", needs=("stages",), options=TripletOptions, stages_of=triplet_stages)
def triplet_term(ctx: Context, opts: TripletOptions) -> torch.Tensor:
    """RGAL's synthesis relation term on the stage features of ``target`` (student, or teacher).

    Triplets from the teacher's labels (argmax) with negatives drawn by distance-weighted sampling on the
    L2-normalised teacher logits inside the focal ``window`` (:mod:`dfkd_common.relation`); features are each
    chosen stage's map (``stages``: indices into the network's stages, -1 the last), pooled and L2-normalised.
    ``mode: swap`` (default, the paper's intent): the hinge with positive and negative exchanged, so synthesis
    pushes same-label images apart and pulls different-label ones together while the student (``striplet``) does
    the opposite; ``mode: code``: the released code's ordinary triplet loss. 0 without a student (offline, warm-up)
    when the target is the student.
    """
    from dfkd_common.relation import pooled, sample_triplets, triplet_hinge

    feats = ctx.stages
    if not feats:
        return ctx.t_logits.new_zeros(())
    lo, hi = (float(v) for v in opts.window)
    a, p, n = sample_triplets(ctx.t_logits, ctx.t_logits.argmax(1), ctx.gen, window=(lo, hi))
    return triplet_hinge([pooled(f) for f in feats], a, p, n, opts.margin, swap=opts.mode == "swap")


def weighted_sum(weights: Mapping[str, float], ctx: Context,
                 options: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of ``weight * term`` over terms with a non-zero weight, plus each term's value for logging."""
    total = ctx.x.new_zeros((), dtype=torch.float32)
    logs: dict[str, float] = {}
    options = options or {}
    for name, w in weights.items():
        if not w:
            continue
        value = TERMS.get(name)(ctx, options.get(name))
        logs[name] = float(value.detach())
        total = total + w * value
    return total, logs

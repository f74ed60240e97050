"""CPNet (Chen et al., ICCV 2025): NAYER with the generator coupled to the teacher.

Only the differences from :class:`~dfkd_common.synthesis.nayer.NAYER` live here (schedule, text-embedding
input, noisy layer, momentum L_bn, one-hot and adversarial terms are inherited):

1. **Coupled generator**: the body after the noisy layer is the teacher's stage structure mirrored
   (:mod:`dfkd_common.models.coupled`), discovered with a dummy forward, so it works for any BN teacher.
2. **Feature coupling** ``xn`` (weight 1): each generator stage tensor is pulled toward the teacher's BN input at
   the mirrored stage on the same, *un-augmented* generated batch (one extra no-grad teacher forward: random
   crops and CutMix would misalign the two maps), renormalised to that BN's running statistics.
3. **Inverse-classifier alignment** ``align`` (eps 0.1, singular values clamped at 0.1), added to the
   adversarial part after warm-up; its weight defaults to the adversarial weight (the paper adds it *inside*
   L_adv).
4. **CutMix** (probability ``cutmix``, 0.5; a box and lambda per sample) after the differentiable augmentation,
   with the lambda-mixed one-hot loss, and colour jitter (0.1 x3, hue 0.1, p 0.4) in that augmentation.
   CutMix is applied to the one batch every term sees (one teacher forward rather than a second one just for
   the one-hot term).

Two generator options are not in the paper and are off by default: ``g_width`` (every stage gets that many
times the teacher's channels; the first ones are the coupled tensor) and ``g_upsample: bilinear`` (instead of
nearest between stages). On CIFAR ResNets the exact mirror is already wider than the baselines' DCGAN
generators; on LeNet-5 it has 16 and 6 channels and must resize 10 -> 28 -> 32, where nearest repeats rows
unevenly. With both (width 4, bilinear) CPNet's mnist5k students went from 95.8 +- 0.8 % to 96.9 +- 0.6 % over
four seeds (the default pipeline's ``cpnet_wide`` run).

Released-code details followed by default, each with the earlier dfkd behaviour as an option (``g_tap: bn``,
``xn_momentum: 0``, ``cutmix_mode: batch``, ``augment: {jitter: 0.2, hue: 0, jitter_p: 0.8}``): the stage
tensors are taken after LeakyReLU with no activation between the first BN and the first block; the L_xn target
is standardised by batch statistics blended with their EMA (m 0.9); CutMix draws per sample; the jitter above.

Adversarial KL order: the paper writes the adversarial term as NAYER's KL(p_T || p_S) ("teacher_student", the
default here); the released code computes KL(p_S || p_T), available as the ``adv`` term's option
(``terms: {adv: {kl_order: student_teacher}}``). The alignment's label smoothing and singular-value clamp are
the ``align`` term's options.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from dfkd_common.augment_ops import AugmentConfig
from dfkd_common.errors import DfkdError
from dfkd_common.models.coupled import CoupledGenerator, Stage, teacher_stages
from dfkd_common.models.hooks import FeatureHooks, MomentumStats
from dfkd_common.synthesis.base import SYNTHESIZERS
from dfkd_common.synthesis.coupling import CutMix, InverseClassifier, channel_stats
from dfkd_common.synthesis.losses import Context
from dfkd_common.synthesis.nayer import NAYER


@SYNTHESIZERS.register("cpnet")
class CPNet(NAYER):
    name = "cpnet"

    @dataclass(frozen=True)
    class Config(NAYER.Config):
        weights: dict[str, float] = field(default_factory=lambda: {"bn": 10.0, "oh": 0.5, "adv": 1.33,
                                                                   "align": 1.33, "xn": 1.0})
        # the released code's colour jitter: 0.1 brightness/contrast/saturation, hue 0.1, probability 0.4
        augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_pad=4, jitter=0.1, hue=0.1,
                                                                             jitter_p=0.4))
        cutmix: float = 0.5
        cutmix_mode: Literal["sample", "batch"] = "sample"  # a box and lambda per sample (released); or per batch
        xn_momentum: float = 0.9  # L_xn target standardised by batch stats blended with their EMA (released); 0
        g_tap: Literal["act", "bn"] = "act"  # stage tensors after LeakyReLU (released); "bn": BN outputs (< 0.3)
        min_stage_size: int = 2  # teacher stages smaller than this (LeNet-5's 1x1) are not mirrored
        g_width: int = 1  # generator channels per stage = g_width x the teacher's (1: the paper's exact mirror)
        # between stages; bilinear avoids nearest's uneven rows at LeNet's 10->28->32
        g_upsample: Literal["nearest", "bilinear"] = "nearest"

    @classmethod
    def provides(cls) -> frozenset[str]:
        """Beyond the base: the coupled generator's stage tensors (``xn``) and the inverse classifier (``align``)."""
        return super().provides() | {"coupling", "inverse_classifier"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        modules = dict(self.teacher.named_modules())
        self.stage_paths = [s.path for s in reversed(self.stages)]  # deepest first, as the generator's
        self.stage_bns = [modules[p] for p in self.stage_paths]
        align = self.term_options("align")
        if not hasattr(self.teacher, "classifier"):
            raise DfkdError("cpnet: its inverse-classifier term reads the teacher's last nn.Linear (the class "
                            "hyperplanes), and this teacher makes its logits without one; nayer and fast need none")
        self.inverse = InverseClassifier(self.teacher.classifier, align.label_smoothing,
                                         align.min_singular).to(self.device)
        self.cutmix = CutMix(self.cfg.cutmix, self.gen, self.cfg.cutmix_mode)
        # per coupled stage: the L_xn targets' statistics and their EMA (the momentum variant of L_bn's)
        self.xn = [MomentumStats(self.cfg.xn_momentum) for _ in self.stage_paths]
        self.augment = nn.Sequential(self.augment, self.cutmix)

    @functools.cached_property
    def stages(self) -> list[Stage]:
        """The teacher's stage boundaries (one dummy forward; needed first by NAYER.__init__'s generator)."""
        return teacher_stages(self.teacher, self.info.channels, self.info.image_size,
                              self.cfg.min_stage_size)

    def make_body(self, nz: int) -> nn.Module:
        if self.cfg.g_width < 1:
            raise DfkdError(f"cpnet: g_width must be >= 1, got {self.cfg.g_width!r}")
        return CoupledGenerator(self.stages, nz, self.info.image_size, self.info.channels,
                                width=self.cfg.g_width, upsample=self.cfg.g_upsample,
                                tap=self.cfg.g_tap)

    def generate(self, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        with self.engine.autocast():
            x, stages = self.generator(y, return_stages=True)
        return x.float(), stages

    def make_context(self, x: torch.Tensor, y: torch.Tensor, student: Any,
                     g_stages: list[torch.Tensor] | None) -> Context:
        phis = self.teacher_stage_inputs(x) if self.weights.get("xn") else []
        ctx = self.context(x, y, student)
        ctx.cutmix = self.cutmix.last
        ctx.inverse_classifier = self.inverse
        if phis:
            stats = self.xn_stats(phis)
            assert g_stages is not None  # the coupled generator returns its stage tensors
            ctx.coupling = list(zip(g_stages, phis, self.stage_bns, stats, strict=True))
        return ctx

    def xn_stats(self, phis: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Statistics that standardise the L_xn targets: the batch's, blended (1 - m) batch + m EMA with their
        EMA over earlier rounds when ``xn_momentum`` m > 0 (as L_bn's momentum variant); the EMA takes the last
        step's batch statistics at the end of each round."""
        return [s.blend(*channel_stats(p)) for s, p in zip(self.xn, phis, strict=True)]

    @property
    def xn_ema(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The L_xn statistics' EMA per coupled stage (None before the first round, or with momentum 0)."""
        emas = [s.ema for s in self.xn]
        return None if any(e is None for e in emas) else emas  # type: ignore[return-value]

    def end_round(self) -> None:
        super().end_round()
        if self.cfg.xn_momentum > 0:
            for s in self.xn:
                s.update()

    def state_dict(self) -> dict[str, Any]:
        ema = self.xn_ema
        return {**super().state_dict(), "xn_ema": [t for pair in ema for t in pair] if ema is not None else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        ema = list(state.get("xn_ema") or [])
        for i, s in enumerate(self.xn):
            s.ema = (ema[2 * i].to(self.device), ema[2 * i + 1].to(self.device)) if ema else None

    @torch.no_grad()
    def teacher_stage_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's BN inputs at the coupled stages on the clean batch.

        Called inside :meth:`bn_active`: the L_bn hooks are paused for this extra forward (its statistics belong
        to no optimisation step) and switched back on for the step's own, augmented forward that follows.
        """
        if self.bn is not None:
            self.bn.enable(False)
        try:
            with FeatureHooks(self.teacher, self.stage_paths, capture="input") as hooks, self.engine.autocast():
                self.teacher(self.engine.images(x.detach()))
            return [hooks.features[p].float() for p in self.stage_paths]
        finally:
            if self.bn is not None:
                self.bn.enable(True)

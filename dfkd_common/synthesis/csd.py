"""CSD synthesis (Luo et al., ICME 2023), DDA's synthesis step (ACM MM 2024): ``geninv`` plus rotation self-supervision.

How it differs from ``geninv`` (:mod:`dfkd_common.synthesis.geninv`): one more term, ``dda`` (weight 10 online,
0 for the initial bank), ``-CE(H(f_S(rot_k(aug x))), 4y + k)``: every augmented image rotated by k * 90 degrees,
the student's pooled penultimate features (student in eval mode, fixed) through the student side's rotation head
H (the student term ``rot``, fixed during synthesis), y the round's targets. The generator *maximises* the head's
CE: it makes images whose class-and-rotation the student's features do not yet tell apart (:mod:`dfkd_common.rotation`).
After every round the head is re-initialised (weights from this synthesizer's generator, momentum cleared), and the
student's steps of the next epoch train it anew. The adversarial term is off (adv 0, as published).

The initial bank is ``dfkd synthesize --method csd`` with ``weights.dda: 0`` (no student exists offline; the term
is 0 there anyway). Its student objective (``student_objective``): KD at tau 20 + CE on bank labels + 30 x ``fea``
(the align head) + ``rot`` (trains the head) (:mod:`dfkd_common.student.dda`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dfkd_common.errors import DfkdError
from dfkd_common.models.hooks import Penultimate
from dfkd_common.rotation import ROTATION_HEAD, RotationHeadProvider, rotations
from dfkd_common.synthesis.base import SYNTHESIZERS, StudentObjective, SynthResult, student_network
from dfkd_common.synthesis.geninv import GenerativeInversion
from dfkd_common.synthesis.losses import Context, term


@term("dda", needs=("rotation",))
def rotation_term(ctx: Context, opts: Any) -> torch.Tensor:
    """-CE of the student side's rotation head on the 4 rotations (0 without a student: offline, warm-up)."""
    rot = ctx.rotation
    if rot is None:
        return ctx.t_logits.new_zeros(())
    logits, labels = rot
    return -F.cross_entropy(logits.float(), labels)


def rotation_head(student: Any) -> RotationHeadProvider | None:
    """What the student side provides as its rotation head (its ``rot`` term), or None (no side: offline,
    warm-up; or a bare network; or a side without one)."""
    provider = getattr(student, "provider", None)
    return provider(ROTATION_HEAD) if provider is not None else None


@SYNTHESIZERS.register("csd")
class CSD(GenerativeInversion):
    name = "csd"

    @dataclass(frozen=True)
    class Config(GenerativeInversion.Config):
        weights: dict[str, float] = field(default_factory=lambda: {"bn": 1.0, "oh": 1.0, "adv": 0.0, "dda": 10.0})

    student_objective = StudentObjective(weights={"kd": 1.0, "ce": 1.0, "fea": 30.0, "rot": 1.0},
                                         terms={"kd": {"tau": 20.0}})

    @classmethod
    def provides(cls) -> frozenset[str]:
        return cls.BASE_PROVIDES | {"rotation"}

    def context(self, x: torch.Tensor, y: torch.Tensor | None, student: Any = None) -> Context:
        ctx = super().context(x, y, student)
        if not self.weights.get("dda") or student is None:
            return ctx
        rot = rotation_head(student)
        if rot is None:
            raise DfkdError("csd: weights.dda needs the student's rotation head: add the student term rot to "
                            "distill's weights (rot: 1), or set the synthesis weight dda to 0")
        net = student_network(student)
        assert y is not None
        assert ctx.xa is not None
        xr, yr = rotations(ctx.xa, y)
        with Penultimate(net) as hook, self.engine.autocast():
            net(xr)
            ctx.rotation = (rot.head(hook.value.float()), yr)
        return ctx

    def synthesize(self, round_index: int, student: Any = None) -> SynthResult:
        result = self.invert(round_index, student)
        rot = rotation_head(student)
        if rot is not None:
            rot.reset(self.gen)
        self.end_round()
        return result

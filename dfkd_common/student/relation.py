"""RGAL's student relation terms (IJCV 2024; published flags ``striplet`` and ``cd_loss``).

* ``striplet``: the ordinary triplet loss on the student's pooled, L2-normalised penultimate features. Every bank
  image appears in two independently augmented views of each batch (``views = 2``), so same-label positives exist
  even in small batches; labels are the teacher's argmax, negatives drawn by plain distance-weighted sampling on
  the student's normalised logits (d clamped >= 0.5, kept for d < 1.4). The student pulls same-label images
  together and pushes different labels apart: the opposite of what synthesis (``triplet``, swap mode) asks.
* ``cd``: per chosen stage pair, MSE(GAP(A(s_l)), GAP(t_l)), A a 1x1 conv (with bias) from the student's channels
  to the teacher's, trained with the student (its optimiser and schedule), resumed with the run and never part of
  the student checkpoint. Stages come from the shared stage discovery of both networks (``stages``: indices,
  -1 the last), so any zoo pair works, VGG included.

Both are on for the first ``custom_steps`` fraction of the epochs (published default 1.0: always).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_common.errors import DfkdError
from dfkd_common.models.hooks import stage_outputs
from dfkd_common.relation import pooled, sample_triplets, triplet_hinge
from dfkd_common.student.base import StudentStep, StudentTerm, TermSetup, register


class _Scheduled(StudentTerm):
    """A relation term is on for the first ``custom_steps`` fraction of the epochs only."""

    @property
    def part_time(self) -> bool:
        return float(self.opts.custom_steps) < 1.0


@register
class StudentTriplet(_Scheduled):
    name = "striplet"
    @dataclass(frozen=True)
    class Options:
        margin: float = 0.2
        clamp: tuple[float, float] = (0.5, 1.4)
        custom_steps: float = 1.0  # the fraction of the epochs the term is on
    needs: ClassVar[frozenset[str]] = frozenset({"s_logits", "t_logits", "s_feat"})
    views: ClassVar[int] = 2

    def forward(self, step: StudentStep) -> torch.Tensor:
        if step.progress >= self.opts.custom_steps or step.s_feat is None or step.t_logits is None:
            return step.s_logits.new_zeros(())
        lo, hi = (float(v) for v in self.opts.clamp)
        # negatives from the global CPU stream, which the run's resume state restores
        a, p, n = sample_triplets(step.s_logits, step.t_logits.argmax(1), None, clamp=(lo, hi))
        return triplet_hinge([pooled(step.s_feat)], a, p, n, self.opts.margin)


@register
class ChannelDistill(_Scheduled):
    name = "cd"
    @dataclass(frozen=True)
    class Options:
        stages: tuple[int, ...] = (-1,)  # indices into the networks' stages (-1: the last)
        custom_steps: float = 1.0
    needs: ClassVar[frozenset[str]] = frozenset({"s_logits", "s_stages", "t_stages"})

    def __init__(self, options: dict[str, Any], setup: TermSetup) -> None:
        super().__init__(options, setup)
        s_stages = stage_outputs(setup.student, setup.channels, setup.image_size)
        t_stages = stage_outputs(setup.teacher, setup.channels, setup.image_size)
        try:
            self.pairs = [(s_stages[int(i)], t_stages[int(i)]) for i in self.opts.stages]
        except IndexError:
            raise DfkdError(f"student term cd: stages {list(self.opts.stages)} out of range (student "
                            f"{len(s_stages)} stages, teacher {len(t_stages)})") from None
        self.adapters = nn.ModuleList(nn.Conv2d(s.channels, t.channels, 1) for s, t in self.pairs)

    def forward(self, step: StudentStep) -> torch.Tensor:
        if step.progress >= self.opts.custom_steps:
            return step.s_logits.new_zeros(())
        total = step.s_logits.new_zeros((), dtype=torch.float32)
        for (s, t), adapt in zip(self.pairs, self.adapters, strict=True):
            s_map, t_map = step.s_stages[s.path], step.t_stages[t.path].detach()
            total = total + F.mse_loss(adapt(s_map.float()).mean((2, 3)), t_map.float().mean((2, 3)))
        return total

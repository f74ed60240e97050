"""DDA's student terms (ACM MM 2024; its released code is CSD's): the align head ``fea`` and the rotation head ``rot``.

DDA's student objective is KD (tau 20) + CE on the bank labels + ``fea`` x 30, plus ``rot``, which trains CSD's
rotation head for the synthesizer (``csd``) and nothing else:

* ``fea``: MSE(AlignHead(student's stage map), teacher's stage map), the last stage by default (the code's
  ``features[-2]``: WRN block 3, ResNet layer 4, pre-pooling). AlignHead = conv1x1 (C_s -> 2C_t) -> BN -> ReLU ->
  conv3x3 (2C_t) -> BN -> ReLU -> conv1x1 (-> C_t), no biases, its output adaptive-average-pooled to the teacher's
  map size where the two differ. It trains with the student (its optimiser and schedule), is resumed with the run
  and never saved into the student checkpoint.
* ``rot``: the CE of :class:`~dfkd_common.rotation.RotationHead` predicting 4y + k on the student's pooled
  penultimate features of the step's images rotated 4 ways (y the bank label; the teacher's where a row has none).
  The features are computed without gradient and with the student in eval mode (no BN statistics from rotated
  images; the same mode the synthesizer reads them in), so the term moves the head only, by its own SGD (lr 0.1,
  momentum 0.9, wd 1e-4, no schedule) after every student step. The ``csd`` synthesizer reads the head during its
  round (``side.terms["rot"].head``) and re-initialises it after every round. Its weight scales only the head's
  gradient: keep it at 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_common.errors import DfkdError
from dfkd_common.geometry import as_hw
from dfkd_common.models.hooks import Penultimate, stage_outputs
from dfkd_common.rotation import ROTATION_HEAD, RotationHead, rotations
from dfkd_common.student.base import StudentStep, StudentTerm, TermSetup, register


def align_head(c_s: int, c_t: int) -> nn.Sequential:
    """DDA's AlignHead from C_s student channels to C_t teacher channels (no biases)."""
    return nn.Sequential(
        nn.Conv2d(c_s, 2 * c_t, 1, bias=False), nn.BatchNorm2d(2 * c_t), nn.ReLU(inplace=True),
        nn.Conv2d(2 * c_t, 2 * c_t, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c_t), nn.ReLU(inplace=True),
        nn.Conv2d(2 * c_t, c_t, 1, bias=False),
    )


@register
class FeatureAlign(StudentTerm):
    name = "fea"
    @dataclass(frozen=True)
    class Options:
        stage: int = -1  # the stage map aligned: an index into the networks' stages (-1: the last)
    needs: ClassVar[frozenset[str]] = frozenset({"s_logits", "s_stages", "t_stages"})

    def __init__(self, options: dict[str, Any], setup: TermSetup) -> None:
        super().__init__(options, setup)
        s_stages = stage_outputs(setup.student, setup.channels, setup.image_size)
        t_stages = stage_outputs(setup.teacher, setup.channels, setup.image_size)
        i = self.opts.stage
        try:
            self.s_stage, self.t_stage = s_stages[i], t_stages[i]
        except IndexError:
            raise DfkdError(f"student term fea: stage {i} out of range (student {len(s_stages)} stages, teacher "
                            f"{len(t_stages)})") from None
        self.align = align_head(self.s_stage.channels, self.t_stage.channels)

    def forward(self, step: StudentStep) -> torch.Tensor:
        t_map = step.t_stages[self.t_stage.path].detach().float()
        s_map = self.align(step.s_stages[self.s_stage.path].float())
        if s_map.shape[-2:] != t_map.shape[-2:]:
            s_map = F.adaptive_avg_pool2d(s_map, t_map.shape[-2:])
        return F.mse_loss(s_map, t_map)


@register
class RotationTerm(StudentTerm):
    name = "rot"
    @dataclass(frozen=True)
    class Options:  # the head's own SGD
        lr: float = 0.1
        momentum: float = 0.9
        weight_decay: float = 1e-4
    needs: ClassVar[frozenset[str]] = frozenset({"s_logits", "t_logits", "labels"})
    provides: ClassVar[frozenset[str]] = frozenset({ROTATION_HEAD})

    def __init__(self, options: dict[str, Any], setup: TermSetup) -> None:
        super().__init__(options, setup)
        student = setup.student
        with Penultimate(student) as hook, torch.no_grad():
            was = student.training
            student.eval()
            student(torch.zeros(1, setup.channels, *as_hw(setup.image_size),
                                device=next(student.parameters()).device))
            student.train(was)
            dim = hook.value.flatten(1).shape[1]
        self.head = RotationHead(dim, int(student.num_classes))
        self._student = [student]  # a reference, not a submodule: the student is saved and optimised elsewhere
        self._opt: torch.optim.Optimizer | None = None

    def optimizer(self) -> torch.optim.Optimizer:
        if self._opt is None:
            self._opt = torch.optim.SGD(self.head.parameters(), lr=self.opts.lr, momentum=self.opts.momentum,
                                        weight_decay=self.opts.weight_decay)
        return self._opt

    def reset(self, generator: torch.Generator) -> None:
        """A fresh head (weights from ``generator``) with a fresh optimiser state: CSD's per-round re-start."""
        self.head.reset(generator)
        if self._opt is not None:
            for p in self.head.parameters():
                self._opt.state.pop(p, None)

    def forward(self, step: StudentStep) -> torch.Tensor:
        y = step.labels
        if step.t_logits is not None:
            y = torch.where(y >= 0, y, step.t_logits.argmax(1))
        xr, yr = rotations(step.x, y)
        student = self._student[0]
        was = student.training
        student.eval()
        try:
            with torch.no_grad(), Penultimate(student) as hook:
                student(xr)
                feat = hook.value.float()
        finally:
            student.train(was)
        return F.cross_entropy(self.head(feat), yr)

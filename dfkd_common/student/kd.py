"""Hinton's KD, the student objective of DeepInversion, DAFL, Fast, NAYER, CPNet (and DFND's first summand)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dfkd_common.student.base import StudentStep, StudentTerm, TermSetup, register
from dfkd_common.tasks import get_task


@register
class KD(StudentTerm):
    """KL(p_T^tau || p_S^tau) * tau^2 reduced as the task says (classification: the batch mean; tau 4 here, 20 in
    the CMI-family CIFAR recipes)."""

    name = "kd"

    @dataclass(frozen=True)
    class Options:
        tau: float = 4.0  # 4 here; 20 in the CMI-family CIFAR recipes

    def __init__(self, options: dict[str, Any], setup: TermSetup) -> None:
        super().__init__(options, setup)
        self.task = get_task(setup.task)

    def forward(self, step: StudentStep) -> torch.Tensor:
        assert step.t_logits is not None
        return self.task.kd(step.s_logits, step.t_logits, self.opts.tau)

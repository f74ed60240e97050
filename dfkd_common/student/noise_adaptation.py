"""DFND's student loss: KD plus noise adaptation through a learnable label-transition matrix.

Retrieved wild images are labelled by the teacher, and the teacher is wrong on part of them (its accuracy on
its own test data is an optimistic estimate of how often). DFND models the noisy label as the student's clean
prediction passed through a transition matrix ``Q`` (``Q[i, j] = P(noisy label j | true class i)``)::

    loss = kd * KD_tau(S, T) + na * NLL(log(softmax(S(x)) @ Q), argmax T(x))      (terms kd and na)

``Q``'s diagonal is fixed to the teacher's accuracy ``acc`` (the chance its label is right); each row's
off-diagonal mass ``1 - acc`` is spread by ``softmax(theta_row)`` over the other classes, with ``theta`` (C x C,
zeros at start: uniform noise) learned jointly with the student by its own Adam (lr 1e-3, the paper's setting:
the term's own optimiser, :meth:`StudentTerm.optimizer`). Rows therefore always sum to one and ``Q`` stays a valid
transition matrix whatever ``theta`` becomes. Because the diagonal is fixed, the student cannot explain its
disagreements away as "noise" wholesale; it can only learn *which* confusions the teacher's labels contain.

``acc`` comes from the teacher checkpoint's measured test accuracy (the term's setup); an explicit
``terms.na.teacher_acc`` wins (e.g. an estimate of the teacher's accuracy on the wild domain) and is required when
the checkpoint has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_common.errors import DfkdError
from dfkd_common.student.base import StudentStep, StudentTerm, TermSetup, register


def transition_matrix(theta: torch.Tensor, acc: float) -> torch.Tensor:
    """Q (C x C): diagonal ``acc``, off-diagonal of row i = softmax over j != i of theta[i, j] times (1 - acc)."""
    c = theta.shape[0]
    eye = torch.eye(c, dtype=torch.bool, device=theta.device)
    off = torch.softmax(theta.masked_fill(eye, float("-inf")), dim=1)
    return off * (1.0 - acc) + eye.to(theta.dtype) * acc


@register
class NoiseAdaptation(StudentTerm):
    """NLL(log(softmax(S(x)) @ Q), argmax T(x)) through the learned transition matrix (see the module docstring).

    DFND's student objective is ``kd`` (tau 4) + ``na``: ``weights: {kd: 1, na: 1}``.
    """

    name = "na"
    @dataclass(frozen=True)
    class Options:
        theta_lr: float = 1e-3
        teacher_acc: float | None = None  # None: the teacher checkpoint's measured accuracy

    def __init__(self, options: dict[str, Any], setup: TermSetup) -> None:
        super().__init__(options, setup)
        acc = self.opts.teacher_acc
        if acc is None:
            acc = setup.teacher_accuracy
        if acc is None:
            raise DfkdError("student term na: the teacher checkpoint has no measured accuracy; set "
                            "terms.na.teacher_acc (e.g. --set terms.na.teacher_acc=0.95)")
        acc = float(acc)
        if not 0.0 < acc <= 1.0:
            raise DfkdError(f"student term na: teacher accuracy must be in (0, 1], got {acc}")
        self.acc = acc
        k = setup.student.num_classes
        self.theta = nn.Parameter(torch.zeros(k, k))

    def q(self) -> torch.Tensor:
        return transition_matrix(self.theta, self.acc)

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.theta], lr=self.opts.theta_lr)

    def forward(self, step: StudentStep) -> torch.Tensor:
        assert step.t_logits is not None
        target = step.t_logits.argmax(1)
        noisy = torch.softmax(step.s_logits.float(), 1) @ self.q()
        return F.nll_loss(torch.log(noisy.clamp_min(1e-12)), target)

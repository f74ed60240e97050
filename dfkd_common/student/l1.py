"""DFAD's student objective: mean |S(x) - T(x)| over logits (no temperature, no softmax).

L1 on raw logits keeps a gradient where KL saturates (the student already agrees on the argmax), which is what the
adversarial generator exploits; the paper shows it beats KL for this game.
"""

from __future__ import annotations

import torch

from dfkd_common.functional import l1_discrepancy
from dfkd_common.student.base import StudentStep, StudentTerm, register


@register
class L1(StudentTerm):
    """Mean absolute logit gap between student and teacher."""

    name = "l1"

    def forward(self, step: StudentStep) -> torch.Tensor:
        assert step.t_logits is not None
        return l1_discrepancy(step.s_logits, step.t_logits)

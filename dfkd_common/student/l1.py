"""DFAD's student loss: mean |S(x) - T(x)| over logits (no temperature, no softmax).

L1 on raw logits keeps a gradient where KL saturates (the student already agrees on the argmax), which is what the
adversarial generator exploits; the paper shows it beats KL for this game.
"""

from __future__ import annotations

import torch

from dfkd_common.functional import l1_discrepancy
from dfkd_common.student.base import STUDENT_LOSSES, Batch, StudentLoss


@STUDENT_LOSSES.register("l1")
class L1Loss(StudentLoss):
    """Mean absolute logit gap between student and teacher."""

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss = l1_discrepancy(batch.s_logits, batch.t_logits)
        return loss, {"l1": float(loss.detach())}

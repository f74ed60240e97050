"""Cross-entropy on the bank's labels (the synthesis target, or the teacher's label for retrieved images).

Rows without a label (-1: DFAD's fresh generator samples) are left out; a batch without any labelled row
contributes 0. DDA's student adds this to KD.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from dfkd_common.student.base import StudentStep, StudentTerm, register


@register
class CE(StudentTerm):
    """CE(S(x), bank label) over the labelled rows."""

    name = "ce"
    needs: ClassVar[frozenset[str]] = frozenset({"s_logits", "labels"})

    def forward(self, step: StudentStep) -> torch.Tensor:
        mask = step.labels >= 0
        if not bool(mask.any()):
            return step.s_logits.new_zeros((), dtype=torch.float32)
        return F.cross_entropy(step.s_logits[mask].float(), step.labels[mask])

"""Hinton's KD, the student loss of DeepInversion, DAFL, Fast, NAYER and CPNet (optionally plus CE on bank labels)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from dfkd_common.functional import kd_loss
from dfkd_common.student.base import STUDENT_LOSSES, Batch, StudentLoss


@STUDENT_LOSSES.register("kd")
class KDLoss(StudentLoss):
    """KL(p_T^tau || p_S^tau) * tau^2 (+ optional ce * CE(S, bank label) where labels exist)."""

    defaults: ClassVar[dict[str, Any]] = {"tau": 4.0, "ce": 0.0}

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss = kd_loss(batch.s_logits, batch.t_logits, float(self.cfg["tau"]))
        logs = {"kd": float(loss.detach())}
        if self.cfg["ce"]:
            mask = batch.labels >= 0
            if mask.any():
                ce = nn.functional.cross_entropy(batch.s_logits[mask].float(), batch.labels[mask])
                logs["ce"] = float(ce.detach())
                loss = loss + float(self.cfg["ce"]) * ce
        return loss, logs

"""Classification: one class per image, K logits per image, judged by top-1 accuracy.

The target is the class index (int64; -1 where a bank row has none: DFAD's unlabelled generator samples, a pool);
the teacher's logits are stored as float16 (K,). KD is the softmax over the K logits at temperature tau, the
batch mean of KL(p_T || p_S) times tau^2 (Hinton's scaling, so gradients do not shrink with tau). Synthesis draws
balanced targets: each class n/K times in a round, the remainder rotating with the round index, shuffled.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from dfkd_common.errors import DfkdError
from dfkd_common.functional import kd_loss
from dfkd_common.tasks.base import TASKS, Column, Task


class Classification(Task):
    name = "classification"
    target = "labels"
    headline = "test_acc"
    headline_label = "test accuracy"
    metric_names: ClassVar[tuple[str, ...]] = ("test_acc",)

    def target_column(self, num_classes: int, image_size: tuple[int, int]) -> Column:
        return Column(np.int64)

    def logits_column(self, num_classes: int, image_size: tuple[int, int]) -> Column:
        return Column(np.float16, (num_classes,))

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1)

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return {"test_acc": float((logits.argmax(1) == targets).float().mean())}

    def kd(self, s_logits: torch.Tensor, t_logits: torch.Tensor, tau: float) -> torch.Tensor:
        return kd_loss(s_logits, t_logits, tau)

    def draw_targets(self, n: int, round_index: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
        y = (torch.arange(n) + round_index * n) % num_classes
        return y[torch.randperm(n, generator=gen)]

    def check_targets(self, targets: torch.Tensor, num_classes: int, where: str) -> None:
        if targets.numel() and int(targets.max()) >= num_classes:
            raise DfkdError(f"{where} has label {int(targets.max())} >= {num_classes} classes")


TASKS.register("classification")(Classification())

"""Semantic segmentation: one class per pixel, K logits per pixel, judged by mean IoU.

The target is a mask, uint8 (H, W) per row, class indices with :data:`IGNORE` (255) where a pixel has no label
(a void border, an unlabelled row); the teacher's logits are stored as float16 (K, H, W) per row, only on request
(at 64x64 with 11 classes they are 180 KB a row). Metrics over a whole split: the confusion matrix of every
labelled pixel, then IoU_k = TP / (TP + FP + FN) per class, **mIoU** (the headline) the mean over the classes that
occur in the targets or the predictions (a class absent from both has no IoU, as in the published evaluations),
and the pixel accuracy. KD is classification's at every pixel: KL(p_T || p_S) over the class axis, averaged over
the pixels, times tau^2. Synthesis draws no targets: a segmentation bank's masks are the teacher's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from dfkd_common.errors import DfkdError
from dfkd_common.functional import kd_loss
from dfkd_common.tasks.base import TASKS, Column, Task

#: the mask value of a pixel without a label: never counted, never trained on
IGNORE = 255


def pixels_last(logits: torch.Tensor) -> torch.Tensor:
    """(N, K, H, W) logits as (N * H * W, K) rows, one per pixel."""
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts of (true class, predicted class) over the labelled pixels (int64)."""
    keep = target != IGNORE
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_per_class(matrix: torch.Tensor) -> torch.Tensor:
    """IoU of each class from a confusion matrix; NaN for a class neither in the targets nor predicted."""
    tp = matrix.diag().double()
    union = matrix.sum(0).double() + matrix.sum(1).double() - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


class Segmentation(Task):
    name = "segmentation"
    target = "masks"
    headline = "miou"
    headline_label = "mIoU"
    metric_names: ClassVar[tuple[str, ...]] = ("miou", "pixel_acc")
    draws_targets: ClassVar[bool] = False
    logits_by_default: ClassVar[bool] = False  # 180 KB a row at 64x64 x 11 classes, against 4 KB of image

    def target_column(self, num_classes: int, image_size: tuple[int, int]) -> Column:
        return Column(np.uint8, tuple(image_size))

    def logits_column(self, num_classes: int, image_size: tuple[int, int]) -> Column:
        return Column(np.float16, (num_classes, *image_size))

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1).to(torch.uint8)

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        matrix = confusion(logits.argmax(1), targets, logits.shape[1])
        iou = iou_per_class(matrix)
        labelled = int(matrix.sum())
        return {"miou": float(iou.nanmean()) if bool((~iou.isnan()).any()) else 0.0,
                "pixel_acc": float(matrix.diag().sum()) / labelled if labelled else 0.0}

    def breakdown(self, logits: torch.Tensor, targets: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
        """Each class's IoU by name (None for a class neither in the targets nor predicted): which classes the
        mIoU hides."""
        iou = iou_per_class(confusion(logits.argmax(1), targets, logits.shape[1])).tolist()
        names = list(classes) if len(classes) == len(iou) else [str(k) for k in range(len(iou))]
        return {"iou_per_class": {n: (None if v != v else round(v, 4)) for n, v in zip(names, iou, strict=True)}}

    def output_shape(self, n: int, num_classes: int, image_size: tuple[int, int]) -> tuple[int, ...]:
        return (n, num_classes, *image_size)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, targets.long(), ignore_index=IGNORE)

    def kd(self, s_logits: torch.Tensor, t_logits: torch.Tensor, tau: float) -> torch.Tensor:
        return kd_loss(pixels_last(s_logits), pixels_last(t_logits), tau)

    def draw_targets(self, n: int, round_index: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
        raise DfkdError("this synthesis method draws class targets; a segmentation teacher has none to draw (its "
                        "bank's masks are the teacher's)")

    def check_targets(self, targets: torch.Tensor, num_classes: int, where: str) -> None:
        labelled = targets[targets != IGNORE]
        if labelled.numel() and int(labelled.max()) >= num_classes:
            raise DfkdError(f"{where} has mask value {int(labelled.max())} >= {num_classes} classes (and not "
                            f"{IGNORE}, the ignore index)")


TASKS.register("segmentation")(Segmentation())

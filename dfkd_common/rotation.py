"""CSD's rotation self-supervision (the synthesis side of DDA, ACM MM 2024; CSD, ICME 2023), written once.

The auxiliary task: given the student's pooled penultimate feature of an image rotated by k * 90 degrees, predict
the *joint* label ``4 y + k`` (class and rotation at once, 4C classes). How well a small head does this on the
student's features is CSD's estimate of what the student has learnt; synthesis makes images on which the head
fails (it *maximises* the head's CE, synthesis term ``dda``), and the student side trains the head on the
student's detached features after every student step (student term ``rot``), so the head follows the student.

* :func:`rotations`: the 4 rotations of a batch (rotation-major: rows ``k * B .. (k + 1) * B`` are rotated by k)
  and their joint labels.
* :class:`RotationHead`: ``Linear(d, d) -> ReLU -> Linear(d, 4C)``, output L2-normalised (the published head:
  its logits lie on the unit sphere, so the CE stays within about log(4C) and neither side can drive it to
  extremes). :meth:`RotationHead.reset` re-draws its weights from a given generator, so a resumed run re-creates
  exactly the heads an uninterrupted one would.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

ROTATIONS = 4
#: the capability a student term provides (``rot``) and a synthesizer asks the student side for (``csd``)
ROTATION_HEAD = "rotation_head"


class RotationHeadProvider(Protocol):
    """What the student side hands a synthesizer that asks for :data:`ROTATION_HEAD`: the head to attack, and
    its re-initialisation after every synthesis round."""

    head: RotationHead

    def reset(self, generator: torch.Generator) -> None: ...


def rotations(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (B, C, H, W) rotated by 0, 90, 180 and 270 degrees (4B rows, rotation-major) and labels 4y + k."""
    xs = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(ROTATIONS)])
    ys = torch.cat([ROTATIONS * y + k for k in range(ROTATIONS)])
    return xs, ys


class RotationHead(nn.Module):
    """The joint class-and-rotation classifier on a student's penultimate features (see the module docstring)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, ROTATIONS * num_classes))

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(feat.flatten(1)), dim=1)

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """PyTorch's default Linear initialisation (uniform, bound 1/sqrt(fan_in)), drawn from ``generator``."""
        for m in self.net:
            if isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                for p in (m.weight, m.bias):
                    p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)

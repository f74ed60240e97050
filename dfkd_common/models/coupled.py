"""CPNet's coupled generator: the teacher's stage structure, mirrored, discovered from the model itself.

CPNet (Chen et al., ICCV 2025) treats the generator as an approximate inverse of the teacher, so the generator's
layers should correspond to the teacher's stages. :func:`teacher_stages` finds those stages with one dummy
forward pass instead of a per-architecture table: every ``BatchNorm2d`` reports the shape of its input, and for
each spatial resolution the *last* BN to run at that resolution marks the end of that stage (its input is the
stage's last feature map). This gives, for example, LeNet-5 (6@28, 16@10, 120@1), CIFAR ResNet-18/34
(64@32, 128@16, 256@8, 512@4), WRN-40-2 (32@32, 64@16, 128@8, the final BN) and VGG-11-BN (64@32 ... 512@2)
without naming a module.

:class:`CoupledGenerator` mirrors them, deepest first:
``z -> Linear -> C0 x s0 x s0 -> BN`` (= stage tensor g_0), then per shallower stage
``LeakyReLU -> [upsample to s_i] -> conv3x3 -> BN`` (= g_i), and finally
``LeakyReLU -> [upsample to the image size] -> conv3x3 -> sigmoid``.
That is ``tap: bn`` (dfkd before 0.3): the stage tensors g_i are BN outputs (before the activation), which as
affine maps can match any per-channel mean/variance of the renormalised teacher BN inputs. The default,
``tap: act``, follows CPNet's released code: no activation between ``bn0`` and the first block, and every later
stage tensor is taken *after* its LeakyReLU (``conv3x3 -> BN -> LeakyReLU`` = g_i).

Stages smaller than ``min_size`` (LeNet-5's 1x1 map) are dropped: nearest/bilinear upsampling of a 1x1 map is
constant, so the generator would have to draw digits from zero-padding border effects; the Linear layer plays
that stage's role instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_common.errors import DfkdError
from dfkd_common.geometry import Size, as_hw
from dfkd_common.index import WITHOUT_BN
from dfkd_common.models.generators import GENERATORS
from dfkd_common.models.hooks import Stage, bn_stages


def teacher_stages(model: nn.Module, channels: int, image_size: Size, min_size: int = 2) -> list[Stage]:
    """Stage boundaries of ``model`` in forward order (largest resolution first): the last BN input at each
    resolution (:func:`~dfkd_common.models.hooks.bn_stages`), those smaller than ``min_size`` left out."""
    stages = bn_stages(model, channels, image_size, min_size)
    if not stages:
        raise DfkdError(
            f"{type(model).__name__} has no BatchNorm2d on a feature map of at least {min_size}x{min_size}: "
            f"CPNet's coupled generator mirrors the teacher's BN stages; methods that need none: {WITHOUT_BN}"
        )
    return stages


class CoupledGenerator(nn.Module):
    """Vector -> image through the teacher's stages reversed; ``forward(z, return_stages=True)`` also returns
    the stage tensors, deepest first, i.e. in the order of ``self.stages``.

    ``width`` > 1 (not in the paper) gives every stage ``width`` times the teacher's channels; the first
    ``channels`` of each stage are the coupled tensor g_i, the rest are free. The paper's mirror (width 1) is as
    wide as the teacher, which for CIFAR ResNets is wider than the DCGAN generators of its baselines but for
    LeNet-5 (16 and 6 channels) is far narrower.
    """

    def __init__(
        self,
        stages: list[Stage],
        nz: int,
        image_size: Size,
        channels: int,
        slope: float = 0.2,
        width: int = 1,
        upsample: str = "nearest",
        tap: str = "act",
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError("width must be >= 1")
        self.stages = list(reversed(stages))  # deepest (smallest) first
        first = self.stages[0]
        self.image_size = as_hw(image_size)
        self.width = int(width)
        w = self.width
        self.l1 = nn.Linear(nz, w * first.channels * first.height * first.width)
        self.bn0 = nn.BatchNorm2d(w * first.channels)
        self.blocks = nn.ModuleList()
        for prev, cur in zip(self.stages[:-1], self.stages[1:], strict=False):
            self.blocks.append(nn.ModuleDict({
                "conv": nn.Conv2d(w * prev.channels, w * cur.channels, 3, 1, 1, bias=False),
                "bn": nn.BatchNorm2d(w * cur.channels),
            }))
        self.out = nn.Conv2d(w * self.stages[-1].channels, channels, 3, 1, 1)
        self.slope = slope
        if upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample must be nearest or bilinear, got {upsample!r}")
        self.upsample = upsample
        if tap not in ("act", "bn"):
            raise ValueError(f"tap must be act or bn, got {tap!r}")
        self.tap = tap

    def _coupled(self, g: torch.Tensor, stage: Stage) -> torch.Tensor:
        """The stage tensor's coupled channels (the whole tensor for the exact mirror: no strided view)."""
        return g if self.width == 1 else g[:, : stage.channels]

    def _resize(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if x.shape[-2:] == (h, w):
            return x
        if self.upsample == "bilinear":
            return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return F.interpolate(x, size=(h, w), mode="nearest")

    def forward(self, z: torch.Tensor, return_stages: bool = False) -> Any:
        first = self.stages[0]
        g = self.bn0(self.l1(z).view(z.shape[0], self.width * first.channels, first.height, first.width))
        outs = [self._coupled(g, first)]
        act = self.tap == "act"
        for stage, block in zip(self.stages[1:], self.blocks, strict=True):
            # tap "act" (released code): no activation between bn0 and the first block, and each later
            # stage tensor is taken after its LeakyReLU; tap "bn": BN outputs, a LeakyReLU before every block
            h = g if act else F.leaky_relu(g, self.slope)
            h = self._resize(h, stage.height, stage.width)
            g = block["bn"](block["conv"](h))
            if act:
                g = F.leaky_relu(g, self.slope)
            outs.append(self._coupled(g, stage))
        h = g if act and len(self.stages) > 1 else F.leaky_relu(g, self.slope)
        h = self._resize(h, *self.image_size)
        x = torch.sigmoid(self.out(h))
        return (x, outs) if return_stages else x


@GENERATORS.register("coupled")
def coupled(
    teacher: nn.Module, nz: int, image_size: Size, channels: int, min_size: int = 2, **kwargs: Any
) -> nn.Module:
    """Build the mirror of ``teacher`` (see module docstring)."""
    return CoupledGenerator(teacher_stages(teacher, channels, image_size, min_size), nz, image_size, channels,
                            **kwargs)

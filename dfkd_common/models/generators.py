"""Generators that map a latent (noise or class embedding) to images, registered by name.

Output convention: images for a :class:`~dfkd_common.models.zoo.Classifier`, i.e. in [0, 1] pixel space.
``head="sigmoid"`` squashes into [0, 1] (Fast/NAYER/CPNet). ``head="dafl"`` is DAFL's ``tanh -> BN(C, affine
=False)`` output, which produces *normalised* images; we map it back to pixel space with the teacher's
mean/std and clip to [0, 1] with a straight-through gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dfkd_common.errors import DfkdError
from dfkd_common.geometry import Size, as_hw, shape_str
from dfkd_common.registry import Registry

GENERATORS: Registry[Callable[..., nn.Module]] = Registry("generator")
#: the largest side of the DCGAN generator's first feature map: its Linear grows with that side squared
MAX_INIT = 32


def upsamplings(h: int, w: int) -> int:
    """The x2 stages a DCGAN generator needs for an H x W image: 2 (the published generators) up to 128 px; above,
    the fewest that bring the first feature map to at most 32 px (224 px: 3, from 28 x 28)."""
    ups = 2
    while max(h, w) >> ups > MAX_INIT:
        ups += 1
    return ups


def build_generator(name: str, **kwargs: Any) -> nn.Module:
    return GENERATORS.get(name)(**kwargs)


class OutputHead(nn.Module):
    """Final activation; see module docstring."""

    def __init__(self, kind: str, channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if kind not in ("sigmoid", "dafl"):
            raise ValueError(f"unknown generator head {kind!r}")
        self.kind = kind
        self.bn = nn.BatchNorm2d(channels, affine=False) if kind == "dafl" else None
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is None:
            return torch.sigmoid(x)
        x = self.bn(torch.tanh(x)) * self.std + self.mean
        # Straight-through clip: the teacher sees exactly the [0, 1] image a bank will store (a plain
        # clip would kill the gradient of saturated pixels, no clip lets the teacher judge pixels that
        # never reach the bank and labels then flip after quantisation).
        return x + (x.clamp(0, 1) - x).detach()


class DCGenerator(nn.Module):
    """DAFL/DFAD/Fast generator: Linear -> 128 x H/4 x W/4 -> (up x2, conv, BN, LeakyReLU) x 2 -> conv C.

    Above 128 px it upsamples more often (:func:`upsamplings`; ``ups`` overrides): 224 px starts from 28 x 28 and
    upsamples 3 times, so its first Linear stays the size of a 112-px generator's. ``bn_eps``: DAFL's released
    generator uses BatchNorm eps 0.8 (which damps the normalisation of small-variance channels); PyTorch's 1e-5 is
    the default.
    """

    def __init__(
        self,
        nz: int = 100,
        ngf: int = 64,
        image_size: Size = 32,
        channels: int = 1,
        head: str = "sigmoid",
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        bn_eps: float = 1e-5,
        ups: int | None = None,
    ) -> None:
        super().__init__()
        h, w = as_hw(image_size)
        ups = ups if ups is not None else upsamplings(h, w)
        if ups < 1 or any(s % (1 << ups) or s < 8 or s >> ups > MAX_INIT for s in (h, w)):
            raise DfkdError(f"the DCGAN generator (DAFL, DFAD, Fast, NAYER) cannot make {shape_str(channels, (h, w))} "
                            f"images with {ups} upsamplings: sides must be multiples of {1 << ups}, at least 8 and "
                            f"at most {MAX_INIT << ups} (DeepInversion works at any resolution)")
        self.nz = nz
        self.init_size = (h >> ups, w >> ups)
        self.l1 = nn.Linear(nz, 2 * ngf * self.init_size[0] * self.init_size[1])
        layers: list[nn.Module] = [nn.BatchNorm2d(2 * ngf, eps=bn_eps)]
        for i in range(ups):
            out = ngf if i == ups - 1 else 2 * ngf
            layers += [nn.Upsample(scale_factor=2), nn.Conv2d(2 * ngf, out, 3, 1, 1, bias=False),
                       nn.BatchNorm2d(out, eps=bn_eps), nn.LeakyReLU(0.2, inplace=True)]
        self.conv_blocks = nn.Sequential(*layers, nn.Conv2d(ngf, channels, 3, 1, 1))
        self.head = OutputHead(head, channels, mean, std)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.l1(z).view(z.shape[0], -1, *self.init_size)
        return self.head(self.conv_blocks(x))


@GENERATORS.register("dcgan")
def dcgan(**kwargs: Any) -> nn.Module:
    return DCGenerator(**kwargs)

"""Differentiable batch augmentation (kornia) used by synthesis and by student training on bank images.

Synthesis backpropagates through it (the generator must produce images that stay classifiable under crop and
flip); students see the same family on bank images. Horizontal flips are off for digit datasets (a flipped
"2" is not a 2), on for natural-image datasets; both are params.
"""

from __future__ import annotations

from dataclasses import dataclass

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AugmentConfig:
    crop_pad: int = 4
    flip: bool = False
    jitter: float = 0.0  # colour jitter strength (brightness/contrast/saturation); CPNet uses it


class PadCropFlip(nn.Module):
    """Random crop after zero padding (and optional horizontal flip) by one batched gather.

    Same distribution as kornia's ``RandomCrop(padding=p)`` + ``RandomHorizontalFlip``, differentiable w.r.t.
    the images, but one indexing op instead of kornia's per-sample crop machinery: on the 2-core CPU, for
    256 LeNet-sized images, kornia's crop cost as much as the whole teacher forward+backward it augments
    (``benchmarks/bench_synthesis.py``), which doubled synthesis time. Colour jitter stays with kornia.
    """

    def __init__(self, pad: int, flip: bool) -> None:
        super().__init__()
        self.pad, self.flip = pad, flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        p = self.pad
        dev = x.device
        xp = F.pad(x, (p, p, p, p)) if p else x
        dy = torch.randint(0, 2 * p + 1, (b, 1), device=dev)
        dx = torch.randint(0, 2 * p + 1, (b, 1), device=dev)
        cols = torch.arange(w, device=dev).view(1, w)
        if self.flip:
            flip = torch.rand(b, 1, device=dev) < 0.5
            cols = torch.where(flip, w - 1 - cols, cols)
        rows = (dy + torch.arange(h, device=dev).view(1, h))[:, :, None]  # (B, H, 1)
        cols = (dx + cols)[:, None, :]  # (B, 1, W)
        out = xp.permute(0, 2, 3, 1)[torch.arange(b, device=dev)[:, None, None], rows, cols]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def build_augment(image_size: int, cfg: AugmentConfig) -> nn.Module:
    ops: list[nn.Module] = []
    if cfg.crop_pad or cfg.flip:
        ops.append(PadCropFlip(cfg.crop_pad, cfg.flip))
    if cfg.jitter:
        j = cfg.jitter
        ops.append(K.ColorJitter(j, j, j, 0.0, p=0.8))
    if not ops:
        return nn.Identity()
    return ops[0] if len(ops) == 1 else nn.Sequential(*ops)


def augment_config(d: dict[str, object] | None) -> AugmentConfig:
    d = dict(d or {})
    return AugmentConfig(
        crop_pad=int(d.get("crop_pad", 4)),  # type: ignore[arg-type]
        flip=bool(d.get("flip", False)),
        jitter=float(d.get("jitter", 0.0)),  # type: ignore[arg-type]
    )


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 0-255 -> float [0, 1] (on the images' device)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images

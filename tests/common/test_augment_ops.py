"""The batch augmentation: what synthesis backpropagates through and what students see."""

from __future__ import annotations

import kornia.augmentation as K
import torch

from dfkd_common.augment_ops import AugmentConfig, build_augment


def test_augment_matches_kornias_sequential_bit_for_bit() -> None:
    """The plain Sequential (faster) draws the same parameters as K.AugmentationSequential: same images/grads."""
    cfg = AugmentConfig(crop_pad=4, flip=True, jitter=0.2)
    ours = build_augment(32, cfg)
    ref = K.AugmentationSequential(K.RandomCrop((32, 32), padding=4), K.RandomHorizontalFlip(),
                                   K.ColorJitter(0.2, 0.2, 0.2, 0.0, p=0.8))
    x = torch.rand(16, 3, 32, 32, requires_grad=True)
    torch.manual_seed(3)
    a = [ours(x) for _ in range(3)]
    torch.manual_seed(3)
    b = [ref(x) for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    ga = torch.autograd.grad(sum(t.sum() for t in a), x)[0]
    gb = torch.autograd.grad(sum(t.sum() for t in b), x)[0]
    assert torch.equal(ga, gb)


def test_crop_is_per_sample_and_keeps_the_gradient_path() -> None:
    aug = build_augment(16, AugmentConfig(crop_pad=3))
    x = torch.rand(1, 1, 16, 16).expand(32, 1, 16, 16).clone().requires_grad_(True)
    torch.manual_seed(0)
    y = aug(x)
    assert y.shape == x.shape
    assert len({tuple(v.flatten().tolist()) for v in y.detach()}) > 1  # different offsets per sample
    y.sum().backward()
    assert x.grad is not None and 0 < float(x.grad.abs().sum()) <= x.numel()  # pixels cropped away get none


def test_no_augmentation_is_the_identity() -> None:
    aug = build_augment(32, AugmentConfig(crop_pad=0, flip=False, jitter=0.0))
    x = torch.rand(4, 1, 32, 32)
    assert torch.equal(aug(x), x)

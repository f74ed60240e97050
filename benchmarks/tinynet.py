"""A network cheap at 224 px, for ``bench_large_bank.py`` (a user's own network, loaded by file path)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """A stride-4 stem and one stride-2 stage: about 0.02 GFLOPs at 224x224, so the bank's I/O is what is timed."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, stride=4, padding=3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))

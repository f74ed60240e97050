"""What every peer adapter needs around the authors' code, written once: their working directory, their
unconditional ``.cuda()`` calls, and their CIFAR training transform without CIFAR on disk."""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def in_dir(path: Path) -> Iterator[None]:
    """Run with ``path`` as cwd: their code writes its pool, logs and checkpoints to paths relative to it."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def cuda_is_identity() -> Iterator[list[str]]:
    """``Tensor.cuda`` and ``Module.cuda`` return their object unchanged while inside (their code calls them
    unconditionally; on one GPU everything is already there, on the CPU it stays there); yields the calls made,
    restores both on exit."""
    calls: list[str] = []
    saved = torch.Tensor.cuda, torch.nn.Module.cuda

    def tensor_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append("Tensor.cuda")
        return self

    def module_cuda(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        calls.append("Module.cuda")
        return self

    torch.Tensor.cuda = tensor_cuda  # type: ignore[method-assign,assignment]
    torch.nn.Module.cuda = module_cuda  # type: ignore[method-assign,assignment]
    try:
        yield calls
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved  # type: ignore[method-assign]


class NoCIFAR:
    """Stands in for torchvision's dataset classes inside their ``get_dataset``: keeps the transform, no data."""

    def __init__(self, root: str, *args: Any, transform: Any = None, **kwargs: Any) -> None:
        self.root = root
        self.transform = transform


def train_transform(registry: types.ModuleType, dataset: str) -> Any:
    """Their CIFAR train transform (what pool images are augmented with), built by their own ``get_dataset``."""
    real = registry.datasets
    registry.datasets = types.SimpleNamespace(CIFAR10=NoCIFAR, CIFAR100=NoCIFAR, SVHN=NoCIFAR, MNIST=NoCIFAR)
    try:
        _, train_dst, _ = registry.get_dataset(name=dataset, data_root="data")
    finally:
        registry.datasets = real
    return train_dst.transform

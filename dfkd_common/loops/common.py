"""What the training loops share: shuffled index batches over in-memory data, and the optimisers they build.

Training data (a dataset split or a bank) lives in memory as uint8 on the training device; batches are index
draws from a seeded generator, converted to float and augmented on the device. On the CPU this beats a
DataLoader over PIL images several times and makes runs repeatable from the seed alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from dfkd_common.errors import DfkdError


def epoch_batches(n: int, batch_size: int, gen: torch.Generator, drop_last: bool = True) -> Iterator[torch.Tensor]:
    """Shuffled index batches covering ``n`` rows once (drop_last keeps BN batches full-sized)."""
    perm = torch.randperm(n, generator=gen)
    stop = n - (n % batch_size) if (drop_last and n >= batch_size) else n
    for i in range(0, stop, batch_size):
        yield perm[i : i + batch_size]


def make_optimizer(
    params: Any, name: str, lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """SGD (Nesterov, momentum 0.9) or Adam, as the teacher and student configs name it."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise DfkdError(f"unknown optimizer {name!r} (sgd or adam)")

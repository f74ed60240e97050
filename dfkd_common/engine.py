"""Device, precision, seeding, progress and atomic file writes: the run-time plumbing every stage shares.

Choices measured on the 2-core AVX512-bf16 CPU (see ``benchmarks/``): channels_last memory format plus bf16
autocast speeds up generator and teacher steps 1.8-4x, so :class:`Engine` turns both on by default for
*synthesis* forward/backward passes; student and teacher training keep fp32 where the accuracy of small
models suffers (configurable). CUDA is used when present with bf16 autocast.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dfkd_common.errors import NonFiniteLossError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available (honouring ``LOCAL_RANK`` under torchrun), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (all devices); return a torch.Generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def rng_state() -> dict[str, Any]:
    """Capture all RNG states so a resumed run continues the same random stream."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Engine:
    """Where and how tensors are computed.

    ``amp`` enables bf16 autocast (CPU and CUDA); ``channels_last`` converts conv models and image batches.
    """

    device: torch.device = field(default_factory=lambda: resolve_device("auto"))
    amp: bool = True
    channels_last: bool = True

    @classmethod
    def create(cls, device: str = "auto", amp: bool = True, channels_last: bool = True) -> Engine:
        return cls(resolve_device(device), amp, channels_last)

    def autocast(self, enabled: bool | None = None) -> contextlib.AbstractContextManager[Any]:
        on = self.amp if enabled is None else enabled
        if not on:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def model(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def images(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def fused_adam(params: Any, lr: float, **kwargs: Any) -> torch.optim.Adam:
    """Adam with the fused kernel (CPU and CUDA): generator optimisers step every few milliseconds on small nets.

    The default per-tensor loop cost 9 ms of CPNet's 134 ms step on the CPU (``benchmarks/bench_online.py``);
    the fused kernel does the same update about 4x faster. Parameter groups and ``state_dict`` are unchanged.
    """
    return torch.optim.Adam(params, lr=lr, fused=True, **kwargs)


def check_finite(loss: torch.Tensor, what: str) -> None:
    """Stop a run with a clear message instead of writing NaN weights or images."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(f"{what} became {value}; lower the learning rate or check the inputs")


def progress(transient: bool = False) -> Progress:
    """A rich progress bar shared by all long loops (hidden automatically when stdout is not a terminal)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=transient,
        disable=os.environ.get("DFKD_NO_PROGRESS") == "1",
    )


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place only if the block succeeds.

    An interrupted or failing writer therefore never leaves a partial file under the final name, and never
    replaces an existing good artifact.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".partial", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

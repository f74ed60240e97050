"""Forward hooks: BN statistics, penultimate features and stage outputs, addressed by module path.

Hooks keep architectures untouched (no custom ``forward`` returning features), so any registered or imported
classifier works with every method.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


class BNStatsHook:
    """Measures how far a batch's per-channel statistics at one BatchNorm2d input are from its running ones.

    ``loss`` = ||mean - running_mean||_2 + ||var - running_var||_2 (L2 norms, not squared: DeepInversion).
    With ``momentum`` m > 0 (Fast/NAYER/CPNet) the batch statistics are first blended with an EMA of earlier
    synthesised batches, (1 - m) * batch + m * ema, and :meth:`update_ema` folds the latest batch in after a
    synthesis round, so one small batch need not match the whole data distribution on its own.
    """

    def __init__(self, module: nn.BatchNorm2d, momentum: float = 0.0) -> None:
        self.module = module
        self.momentum = momentum
        self.ema: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.loss: torch.Tensor | None = None
        self.enabled = True
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self.enabled:
            return
        x = inputs[0].float()
        mean = x.mean(dim=(0, 2, 3))
        var = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).var(dim=1, unbiased=False)
        self.last = (mean.detach(), var.detach())
        if self.momentum > 0 and self.ema is not None:
            m = self.momentum
            mean = (1 - m) * mean + m * self.ema[0]
            var = (1 - m) * var + m * self.ema[1]
        rm, rv = self.module.running_mean, self.module.running_var
        assert rm is not None and rv is not None
        self.loss = torch.linalg.vector_norm(mean - rm, 2) + torch.linalg.vector_norm(var - rv, 2)

    def update_ema(self) -> None:
        if self.last is None:
            return
        if self.ema is None:
            self.ema = self.last
        else:
            m = self.momentum
            self.ema = (m * self.ema[0] + (1 - m) * self.last[0], m * self.ema[1] + (1 - m) * self.last[1])

    def remove(self) -> None:
        self.handle.remove()


class BNStats:
    """All BN hooks of a model; :meth:`loss` sums them after a forward pass."""

    def __init__(self, model: nn.Module, momentum: float = 0.0) -> None:
        self.hooks = [BNStatsHook(m, momentum) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    def __len__(self) -> int:
        return len(self.hooks)

    def loss(self) -> torch.Tensor:
        losses = [h.loss for h in self.hooks if h.loss is not None]
        if not losses:
            return torch.zeros(())
        return torch.stack(losses).sum()

    def enable(self, on: bool) -> None:
        """Hooks cost a reduction per BN layer: switch them off for forwards that are not synthesis."""
        for h in self.hooks:
            h.enabled = on
            h.loss = None

    def update_ema(self) -> None:
        for h in self.hooks:
            h.update_ema()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


class FeatureHooks:
    """Capture module outputs (or inputs, ``capture="input"``) by path; use as a context manager."""

    def __init__(self, model: nn.Module, paths: Iterable[str], capture: str = "output") -> None:
        self.features: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []
        modules = dict(model.named_modules())
        for path in paths:
            if path not in modules:
                raise KeyError(f"no module {path!r} in {type(model).__name__}")
            mod = modules[path]
            if capture == "input":
                self.handles.append(mod.register_forward_pre_hook(self._pre(path)))
            else:
                self.handles.append(mod.register_forward_hook(self._post(path)))

    def _pre(self, path: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            self.features[path] = inputs[0]

        return hook

    def _post(self, path: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self.features[path] = output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self) -> FeatureHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def module_path(model: nn.Module, target: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise KeyError("module not found in model")


class Penultimate(FeatureHooks):
    """Capture the classifier's input (the penultimate feature) of a :class:`Classifier`."""

    def __init__(self, model: nn.Module) -> None:
        self.path = module_path(model, model.classifier)  # type: ignore[attr-defined]
        super().__init__(model, [self.path], capture="input")

    @property
    def value(self) -> torch.Tensor:
        return self.features[self.path]

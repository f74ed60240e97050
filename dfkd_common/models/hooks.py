"""Forward hooks: BN statistics, penultimate features and stage features, addressed by module path.

Hooks keep architectures untouched (no custom ``forward`` returning features), so any registered or imported
classifier works with every method. Stages are found, not named: :func:`trace` runs one forward pass of zeros (no
random draw, so it never moves a seeded stream) and records every module's input and output shape in the order
the modules finish; :func:`stage_outputs` (a stage = the last module to finish at each spatial resolution: a
ResNet's ``layer4``, a WRN's ``block3``, a LeNet block) and :func:`bn_stages` (the last BatchNorm2d input at each
resolution, which CPNet's coupled generator mirrors) both read that trace, for any architecture in the zoo.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dfkd_common.errors import DfkdError
from dfkd_common.geometry import Size, as_hw

#: what serves a TorchScript program, whose layers no hook reaches
LOGITS_ONLY = ("the methods that read only its logits serve it: published dfad (dfkd distill --online dfad), dfnd "
               "(dfkd retrieve), dafl with --set weights.act=0")


def add_hook(module: nn.Module, fn: Any, pre: bool = False) -> Any:
    """``module.register_forward_(pre_)hook(fn)``; a TorchScript program's layers take none: one error line."""
    if isinstance(module, torch.jit.ScriptModule):
        raise DfkdError(f"the network is a TorchScript program: hooks cannot reach its layers ({LOGITS_ONLY})")
    return module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn)


@dataclass(frozen=True)
class Stage:
    """One stage of a model: a module (path) and the shape (channels, height, width) it sees or makes."""

    path: str
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class Traced:
    """One module's call in a dummy forward: its path, class, and 4-D input/output shapes (None if not 4-D)."""

    path: str
    kind: type
    input: tuple[int, int, int] | None
    output: tuple[int, int, int] | None
    container: bool  # has child modules (a block, a stage), as opposed to a single layer


@torch.no_grad()
def trace(model: nn.Module, channels: int, image_size: Size) -> list[Traced]:
    """Every module's call in one eval-mode forward of zeros, in the order the calls finish."""
    calls: list[Traced] = []
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def chw(t: Any) -> tuple[int, int, int] | None:
        return tuple(int(d) for d in t.shape[1:]) if isinstance(t, torch.Tensor) and t.dim() == 4 else None  # type: ignore[return-value]

    def record(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        calls.append(Traced(names[mod], type(mod), chw(inputs[0]) if inputs else None, chw(output),
                            next(mod.children(), None) is not None))

    for module in model.modules():
        if module is not model:
            handles.append(add_hook(module, record))
    was_training = model.training
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model.eval()
        model(torch.zeros(1, channels, *as_hw(image_size), device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return calls


def _last_per_resolution(items: list[Stage], min_size: int) -> list[Stage]:
    last: dict[tuple[int, int], Stage] = {}
    order: list[tuple[int, int]] = []
    for stage in items:
        key = (stage.height, stage.width)
        if key not in last:
            order.append(key)
        last[key] = stage
    return [last[k] for k in order if min(k) >= min_size]


def bn_stages(model: nn.Module, channels: int, image_size: Size, min_size: int = 1) -> list[Stage]:
    """For each spatial resolution (largest first), the last BatchNorm2d to run there and the input it sees."""
    seen = [Stage(c.path, *c.input) for c in trace(model, channels, image_size)
            if issubclass(c.kind, nn.BatchNorm2d) and c.input is not None]
    return _last_per_resolution(seen, min_size)


def _named(model: nn.Module, key: str) -> Any:
    """A feature site the user named for a :class:`~dfkd_common.models.zoo.Classifier` (paths inside its ``net``,
    returned as paths in ``model``), or None."""
    value = getattr(model, "feature_paths", {}).get(key)
    if not value:
        return None
    return [f"net.{p}" for p in value] if isinstance(value, list) else f"net.{value}"


def stage_outputs(model: nn.Module, channels: int, image_size: Size, min_size: int = 1) -> list[Stage]:
    """For each spatial resolution (largest first), the map a stage makes there: the output of the last *block*
    (a module with children) to finish at that resolution, else of the last layer. Stages the user named
    (``features.stages``) are taken as given, in that order.

    Blocks first, because a pre-activation network's next block starts with a BatchNorm at the old resolution
    (a WRN's ``block2.0.bn1`` runs on ``block1``'s output): the stage is ``block1``, not that BN. This gives
    ResNet ``layer1..4``, WRN ``block1..3``, LeNet-5's conv blocks and VGG's last ReLU before each pooling.
    Functional ops (``F.relu`` in a ``forward``) are invisible to hooks, so a map can be pre-activation.
    """
    calls = [c for c in trace(model, channels, image_size) if c.output is not None]
    named = _named(model, "stages")
    if named:
        shapes = {c.path: c.output for c in calls}
        missing = [p for p in named if p not in shapes]
        if missing:
            raise DfkdError(f"features.stages: {missing[0].removeprefix('net.')} makes no N x C x H x W map")
        return [Stage(p, *shapes[p]) for p in named if min(shapes[p][1:]) >= min_size]  # type: ignore[misc]
    blocks = {c.output[1:] for c in calls if c.container}
    seen = [Stage(c.path, *c.output) for c in calls if c.container or c.output[1:] not in blocks]
    return _last_per_resolution(seen, min_size)


class MomentumStats:
    """Per-channel (mean, var) blended with an EMA over earlier synthesis rounds: (1 - m) * batch + m * ema.

    The momentum variant of L_bn (Fast/NAYER/CPNet) and CPNet's L_xn targets share it: :meth:`blend` remembers
    the batch's statistics and returns the blend (the batch's own until an EMA exists, or when m = 0);
    :meth:`update` folds the last batch into the EMA once per round.
    """

    def __init__(self, momentum: float = 0.0) -> None:
        self.momentum = momentum
        self.ema: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def blend(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.last = (mean.detach(), var.detach())
        if self.momentum > 0 and self.ema is not None:
            m = self.momentum
            return (1 - m) * mean + m * self.ema[0], (1 - m) * var + m * self.ema[1]
        return mean, var

    def update(self) -> None:
        if self.last is None:
            return
        if self.ema is None:
            self.ema = self.last
        else:
            m = self.momentum
            self.ema = (m * self.ema[0] + (1 - m) * self.last[0], m * self.ema[1] + (1 - m) * self.last[1])


class BNStatsHook(MomentumStats):
    """Measures how far a batch's per-channel statistics at one BatchNorm2d input are from its running ones.

    ``loss`` = ||mean - running_mean||_2 + ||var - running_var||_2 (L2 norms, not squared: DeepInversion).
    With ``momentum`` m > 0 (Fast/NAYER/CPNet) the batch statistics are first blended with an EMA of earlier
    synthesised batches, (1 - m) * batch + m * ema, and :meth:`update_ema` folds the latest batch in after a
    synthesis round, so one small batch need not match the whole data distribution on its own.
    """

    def __init__(self, module: nn.BatchNorm2d, momentum: float = 0.0) -> None:
        super().__init__(momentum)
        self.module = module
        self.loss: torch.Tensor | None = None
        self.enabled = True
        self.handle = add_hook(module, self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self.enabled:
            return
        x = inputs[0].float()
        mean = x.mean(dim=(0, 2, 3))
        var = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).var(dim=1, unbiased=False)
        mean, var = self.blend(mean, var)
        rm, rv = self.module.running_mean, self.module.running_var
        assert rm is not None and rv is not None
        self.loss = torch.linalg.vector_norm(mean - rm, 2) + torch.linalg.vector_norm(var - rv, 2)

    def update_ema(self) -> None:
        self.update()

    def remove(self) -> None:
        self.handle.remove()


class BNStats:
    """All BN hooks of a model; :meth:`loss` sums them after a forward pass."""

    def __init__(self, model: nn.Module, momentum: float = 0.0) -> None:
        self.hooks = [BNStatsHook(m, momentum) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    def __len__(self) -> int:
        return len(self.hooks)

    def loss(self, first: float = 1.0) -> torch.Tensor:
        """The sum over the layers, the first (the stem's BN, in module order) weighted ``first`` times
        (DeepInversion's ImageNet setting: 10)."""
        losses = [h.loss for h in self.hooks if h.loss is not None]
        if not losses:
            return torch.zeros(())
        if first != 1.0:
            losses[0] = losses[0] * first
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
                self.handles.append(add_hook(mod, self._pre(path), pre=True))
            else:
                self.handles.append(add_hook(mod, self._post(path)))

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


def penultimate_site(model: nn.Module) -> tuple[str | None, str]:
    """Where a :class:`Classifier`'s penultimate feature is: (module path, ``"input"`` or ``"output"``).

    In order: the module the user named (``features.penultimate``: its output); the input of the last
    ``nn.Linear`` that makes the logits (a ``Sequential`` head with Dropout and ReLU between Linear layers
    included); for a network whose logits come from a functional call (``F.linear`` last in ``forward``),
    ``(None, "output")``: :class:`Penultimate` then takes the output of the last layer to run before the logits
    that is flat (N x D, or N x D x 1 x 1 after a global pool)."""
    named = _named(model, "penultimate")
    if named:
        return named, "output"
    try:
        return module_path(model, model.classifier), "input"  # type: ignore[attr-defined]
    except AttributeError:  # logits from a functional call
        return None, "output"


class Penultimate(FeatureHooks):
    """Capture the penultimate feature of a :class:`Classifier` (see :func:`penultimate_site`)."""

    def __init__(self, model: nn.Module) -> None:
        path, capture = penultimate_site(model)
        self.path = path or ""
        self._flat: torch.Tensor | None = None
        if path is not None:
            super().__init__(model, [path], capture=capture)
            return
        super().__init__(model, [])
        for name, mod in model.named_modules():  # discovered on every forward: the last flat output of a layer
            if name and next(mod.children(), None) is None:
                self.handles.append(add_hook(mod, self._flat_hook))

    def _flat_hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and (output.dim() == 2 or (output.dim() == 4 and output.shape[2:]
                                                                          == (1, 1))):
            self._flat = output.flatten(1)

    @property
    def value(self) -> torch.Tensor:
        if not self.path:
            if self._flat is None:
                raise DfkdError("no penultimate feature found: no layer makes a flat N x D output before the "
                                "logits; name one with --set features.penultimate=MODULE_PATH")
            return self._flat
        value = self.features[self.path]
        return value.flatten(1) if value.dim() == 4 else value


def describe_network(model: nn.Module, arch: str, info: Any) -> str:
    """What discovery found on ``model`` for data ``info``, in one line: its input, classes, BatchNorm layers,
    penultimate feature and stages (said before long work, so a wrong guess is seen at once and can be named
    with ``--set features.penultimate=PATH`` / ``features.stages=[...]``)."""
    h, w = info.image_size
    bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    path, capture = penultimate_site(model)
    pen = (f"{capture} of {path.removeprefix('net.')}" if path else "the last flat layer output (functional head)")
    try:
        stages = ", ".join(f"{s.path.removeprefix('net.')} {s.channels}x{s.height}x{s.width}"
                           for s in stage_outputs(model, info.channels, info.image_size))
    except DfkdError as exc:
        stages = f"none ({exc})"
    return (f"{arch}: input {info.channels}x{h}x{w}, {getattr(model, 'num_classes', '?')} classes, "
            f"{bn} BatchNorm2d layer(s), penultimate feature: {pen}; stages: {stages or 'none'}")


class BNTypicality:
    """Per image: how far its own feature statistics at every BatchNorm2d input are from the running ones.

    For image i and channel c of a BN layer, with x^ = (x - running_mean) / sqrt(running_var + eps), the image's
    spatial mean m and variance v of x^ give ``m^2 + (log v)^2``, averaged over the channels and summed over the
    layers (the variance term only where the map has more than one pixel). It is DeepInversion's BN prior taken
    per image instead of per batch: an image of the training distribution has m near 0 and v near 1 in every
    layer, so its score is small whatever the teacher thinks of its class; noise and photos move the early
    layers' statistics far off. Why not the teacher's confidence: a BN classifier is as sure of noise as of its
    digits (``dfkd retrieve``'s docs), while its BN statistics still tell them apart. :attr:`scores` holds the
    last forward's (N,) float32 scores; nothing is kept across forwards.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.running_var is not None]
        self.handles = [add_hook(m, self._hook) for m in self.layers]
        self.scores: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.layers)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        assert isinstance(module, nn.BatchNorm2d) and module.running_mean is not None and module.running_var is not None
        x = inputs[0].float()
        xh = (x - module.running_mean[:, None, None]) / (module.running_var[:, None, None] + module.eps).sqrt()
        m = xh.mean((2, 3))
        score = m.square().mean(1)
        if x.shape[2] * x.shape[3] > 1:
            v = xh.var((2, 3), unbiased=False).clamp_min(1e-8)
            score = score + v.log().square().mean(1)
        self.scores = score if self.scores is None else self.scores + score

    def reset(self) -> None:
        self.scores = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

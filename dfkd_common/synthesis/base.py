"""The Synthesizer interface and the shared machinery of every inversion method.

A synthesizer only has to :meth:`Synthesizer.synthesize` one round of images (optionally against the current
student side, for adversarial methods) and report its state for resuming. Methods are registered classes in
:data:`SYNTHESIZERS`; they declare their defaults and differ mostly in loss weights and in *what* is optimised
(pixels, a generator, a generator plus latents): the round loop that optimises it for ``g_steps`` and keeps the
lowest-loss iterate is :meth:`Synthesizer.optimise`, written once here. A method's params are its
:attr:`Synthesizer.Config`, a frozen dataclass that subclasses the base's (or its parent method's) and states only
the defaults that differ and the params it adds. The teacher is frozen and in eval mode throughout. Loss terms
are registered with what they need (:mod:`dfkd_common.synthesis.losses`); a synthesizer states what it
:meth:`~Synthesizer.provides` beyond the base, and a weighted term it cannot serve is an error when it is built.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from dfkd_common.augment_ops import AugmentConfig, build_augment
from dfkd_common.config import parse, spec, values
from dfkd_common.data import DatasetInfo
from dfkd_common.engine import Engine, check_finite
from dfkd_common.errors import DfkdError
from dfkd_common.index import INDEX, WITHOUT_BN
from dfkd_common.index import serving as index_serving
from dfkd_common.models import Classifier
from dfkd_common.models.hooks import BNStats, FeatureHooks, Penultimate, stage_outputs
from dfkd_common.params import check_weighted_terms
from dfkd_common.registry import Registry
from dfkd_common.synthesis.losses import TERMS, Context, StageRequest, weighted_sum
from dfkd_common.tasks import get_task


@dataclass
class SynthResult:
    """One round's output: images float in [0, 1] on the CPU, their labels, and loss values for logging."""

    images: torch.Tensor
    labels: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SynthesisConfig:
    """What every method takes; a method's ``Config`` subclasses it (or its parent method's)."""

    batch_size: int = 256
    g_steps: int = 100
    weights: dict[str, float] = field(default_factory=dict)  # loss term -> weight (merged over the method's)
    bn_momentum: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    terms: dict[str, dict[str, Any]] = field(default_factory=dict)  # {term: {option: value}}, each term's own


@dataclass(frozen=True)
class StudentObjective:
    """The student objective a method publishes for its online runs (``weights``/``terms`` of ``distill``)."""

    weights: dict[str, float] = field(default_factory=lambda: {"kd": 1.0})
    terms: dict[str, dict[str, Any]] = field(default_factory=dict)


class Synthesizer(ABC):
    """Base class: owns the frozen teacher, its BN/feature hooks, augmentation and the config."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[SynthesisConfig]] = SynthesisConfig
    #: used by ``dfkd distill --online M`` unless the run's params give their own objective; None: the
    #: distill stage's default (KD)
    student_objective: ClassVar[StudentObjective | None] = None
    #: the tasks whose teachers the method can invert: a method built for another is refused in one line
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    #: what the base serves every term: teacher logits and penultimate features, BN hooks, the student's logits
    BASE_PROVIDES: ClassVar[frozenset[str]] = frozenset({"t_logits", "t_feat", "bn", "s_logits", "stages"})

    @torch.no_grad()
    def teacher_targets(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's targets for images ``x`` (CPU), unaugmented: a segmentation bank's masks."""
        with self.engine.autocast():
            return self.task.predict(self.teacher(self.engine.images(x.to(self.device))).float()).cpu()

    @classmethod
    def provides(cls) -> frozenset[str]:
        """Everything this method can put in a term's :class:`Context` (methods add their own, e.g. CPNet's)."""
        return cls.BASE_PROVIDES

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        """Every param this method accepts, with its default, as plain values (for listings)."""
        return values(cls.Config())

    @classmethod
    def config(cls, given: Mapping[str, Any] | SynthesisConfig | None, where: str | None = None) -> Any:
        """This method's config from a params mapping (checked: one line naming a wrong key) or as given."""
        return given if isinstance(given, cls.Config) else parse(cls.Config, given, where or cls.name)

    def __init__(
        self,
        teacher: Classifier,
        info: DatasetInfo,
        cfg: Mapping[str, Any] | SynthesisConfig | None = None,
        engine: Engine | None = None,
        seed: int = 0,
    ) -> None:
        #: typed as Any so a method reads its own Config's fields (``self.cfg.lr_g``) without a cast
        self.cfg: Any = self.config(cfg)
        self._term_options: dict[str, Any] = {}
        self.weights: dict[str, float] = self.check_terms()
        #: what the active (non-zero weight) terms need from each step
        self.needs = frozenset().union(*(TERMS.get(k).needs for k, v in self.weights.items() if v))
        self.engine = engine or Engine.create()
        self.info = info
        self.task = get_task(info.task)
        if self.task.name not in self.tasks:
            raise DfkdError(f"{self.name} cannot invert a {self.task.name} teacher (it serves "
                            f"{', '.join(self.tasks)}); for {self.task.name}: {', '.join(serving(self.task.name))}")
        self.teacher = self.engine.model(teacher).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.bn = BNStats(self.teacher, self.cfg.bn_momentum) if self.weights.get("bn") else None
        if self.bn is not None and not len(self.bn):
            raise DfkdError(f"{self.name}: weights.bn matches the teacher's BatchNorm statistics, and it has no "
                            f"BatchNorm2d layer; methods that need none: {WITHOUT_BN}")
        if self.bn is not None:
            self.bn.enable(False)
        # hooked only where an active term reads it: a teacher hooks cannot reach (TorchScript) serves the others
        self.penultimate = Penultimate(self.teacher) if "t_feat" in self.needs else None
        self.augment = build_augment(info.image_size, self.cfg.augment)
        self.gen = torch.Generator().manual_seed(seed)
        self.classes: torch.Tensor | None = None  # targets restricted to these classes (see targets())
        self.device = self.engine.device
        self._stage_paths: dict[int, list[str]] = {}  # stage module paths per network, traced once
        self._request = self.stage_request()  # checked when the method is built, not at its first step

    def check_terms(self) -> dict[str, float]:
        """Weights and term options: registered names, numbers, known options, needs this method can serve."""
        active = check_weighted_terms(self.name, self.cfg.weights, self.cfg.terms, "loss term",
                                      TERMS.names(), lambda name: spec(TERMS.get(name).Options))
        for name in (k for k, v in active.items() if v):
            missing = sorted(TERMS.get(name).needs - self.provides())
            if missing:
                raise DfkdError(f"{self.name}: weights.{name}: the {name} term needs {', '.join(missing)}, which "
                                f"{self.name} does not provide (a method that does: one registering it in its "
                                "provides())")
            self.term_options(name)  # parsed here: a wrong option is one line when the method is built
        return active

    def term_options(self, name: str) -> Any:
        """The options of term ``name`` for this run (its defaults, overridden by ``terms.<name>``), parsed once."""
        if name not in self._term_options:
            self._term_options[name] = TERMS.get(name).options(self.cfg.terms.get(name), self.name)
        return self._term_options[name]


    # -- helpers shared by methods -------------------------------------------------------------------
    @contextmanager
    def bn_active(self) -> Any:
        if self.bn is not None:
            self.bn.enable(True)
        try:
            yield
        finally:
            if self.bn is not None:
                self.bn.enable(False)

    def targets(self, n: int, round_index: int) -> torch.Tensor | None:
        """The round's targets, drawn by the task (classification: balanced classes, shuffled); where
        :attr:`classes` is set (``dfkd retrieve --top-up``: the classes a bank lacks, each repeated as often as
        it lacks images), cycled through those instead, shuffled. None for a task that draws none
        (segmentation: the teacher's own prediction is the target, and the bank's masks are the teacher's)."""
        if self.classes is None and not self.task.draws_targets:
            return None
        if self.classes is not None:
            y = self.classes[(torch.arange(n) + round_index * n) % len(self.classes)]
            return y[torch.randperm(n, generator=self.gen)].to(self.device)
        return self.task.draw_targets(n, round_index, self.info.num_classes, self.gen).to(self.device)

    def noise(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.device)

    def context(self, x: torch.Tensor, y: torch.Tensor | None, student: Any = None) -> Context:
        """Augment x once, run the teacher on it, and the student where an active term needs its logits.

        ``student`` is the student side (:class:`~dfkd_common.student.StudentSide`) or a bare network, or None
        (offline synthesis, online warm-up: terms that need the student then contribute 0).
        """
        net = student_network(student)
        xa = self.augment(x)
        xa = self.engine.images(xa)
        hooks = self.stage_hooks(net)
        try:
            with self.engine.autocast():
                t_logits = self.teacher(xa)
                run_student = net is not None and ("s_logits" in self.needs or
                                                   (hooks is not None and hooks[0] is not self.teacher))
                s_logits = net(xa) if run_student else None
            stages = [hooks[1].features[p] for p in hooks[2]] if hooks is not None else None
        finally:
            if hooks is not None:
                hooks[1].remove()
        return Context(
            x=x,
            t_logits=t_logits.float(),
            y=y,
            s_logits=None if (s_logits is None or "s_logits" not in self.needs) else s_logits.float(),
            t_feat=self.penultimate.value if self.penultimate is not None else None,
            bn=self.bn,
            xa=xa,
            stages=stages,
            gen=self.gen,
        )

    def stage_request(self) -> tuple[str, StageRequest] | None:
        """The stage maps the active terms read, as the term that needs them declares (``stages_of``): one
        request per run (two terms asking for different maps is an error); None when no active term needs any."""
        requests = {name: TERMS.get(name) for name, w in self.weights.items()
                    if w and "stages" in TERMS.get(name).needs}
        asked: dict[str, StageRequest] = {}
        for name, t in requests.items():
            if t.stages_of is None:
                raise DfkdError(f"{self.name}: the {name} term needs stages but does not say which (stages_of)")
            try:
                asked[name] = t.stages_of(self.term_options(name))
            except DfkdError as exc:
                raise DfkdError(f"{self.name}: {exc}") from None
        if len(set(asked.values())) > 1:
            raise DfkdError(f"{self.name}: the terms {', '.join(sorted(asked))} ask for different stage maps")
        return next(iter(asked.items()), None)

    def stage_hooks(self, net: nn.Module | None) -> tuple[nn.Module, FeatureHooks, list[str]] | None:
        """Hooks on the stages the active terms read (of the student, or the teacher), for one forward; None when
        no active term needs stages or the stages are the absent student's."""
        if self._request is None:
            return None
        term, request = self._request
        target = self.teacher if request.target == "teacher" else net
        if target is None:
            return None
        key = id(target)
        if key not in self._stage_paths:
            stages = stage_outputs(target, self.info.channels, self.info.image_size)
            try:
                self._stage_paths[key] = [stages[i].path for i in request.indices]
            except IndexError:
                raise DfkdError(f"{self.name}: terms.{term}.stages {list(request.indices)} out of range: the "
                                f"{request.target} has {len(stages)} stages") from None
        paths = self._stage_paths[key]
        return target, FeatureHooks(target, paths), paths

    def loss(self, ctx: Context, weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        weights = weights if weights is not None else self.weights
        total, logs = weighted_sum(weights, ctx, {k: self.term_options(k) for k, w in weights.items() if w})
        check_finite(total, f"{self.name} synthesis loss")
        logs["loss"] = float(total.detach())
        return total, logs

    def optimise(self, steps: int, step: Callable[[], tuple[torch.Tensor, Context]], opt: torch.optim.Optimizer,
                 after_backward: Callable[[], None] | None = None,
                 after_step: Callable[[], None] | None = None) -> tuple[torch.Tensor, float, dict[str, float]]:
        """The round loop every method shares: ``steps`` times ``step()`` (images and their loss context), the
        weighted loss, backward, ``after_backward`` (Fast accumulates meta-gradients there), optimiser step,
        ``after_step`` (DeepInversion projects its pixels back into range there).

        Returns the lowest-loss iterate's images (detached, as computed before that step's update), its loss and
        the last step's logs. BN hooks are active for the whole loop.
        """
        if steps < 1:
            raise DfkdError(f"{self.name}: g_steps must be >= 1")
        best_loss, best_x, logs = float("inf"), None, {}
        with self.bn_active():
            for _ in range(steps):
                x, ctx = step()
                loss, logs = self.loss(ctx)
                if logs["loss"] < best_loss:
                    best_loss, best_x = logs["loss"], x.detach()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if after_backward is not None:
                    after_backward()
                opt.step()
                if after_step is not None:
                    after_step()
        assert best_x is not None
        return best_x, best_loss, logs

    def end_round(self) -> None:
        """After each round: fold the last batch statistics into the BN EMA (momentum variant)."""
        if self.bn is not None and self.cfg.bn_momentum:
            self.bn.update_ema()

    def provenance(self) -> dict[str, Any]:
        """The params a bank records (its ``params`` attribute): the config's values, plus what the method
        found out when built (NAYER: the embedding source actually used)."""
        return values(self.cfg)

    # -- the interface ---------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int) -> None:
        """Called before the rounds of each epoch (online: the student's epoch; offline: every round is one).

        Methods with per-epoch schedules (NAYER's generator life) act here; most need nothing.
        """
        return None

    @abstractmethod
    def synthesize(self, round_index: int, student: Any = None) -> SynthResult:
        """Produce one round of images (against the student side where the method is adversarial)."""

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"gen": self.gen.get_state()}
        if self.bn is not None:
            state["bn_ema"] = [list(h.ema) if h.ema is not None else None for h in self.bn.hooks]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        if self.bn is not None and "bn_ema" in state:
            for h, ema in zip(self.bn.hooks, state["bn_ema"], strict=True):
                h.ema = None if ema is None else (ema[0].to(self.device), ema[1].to(self.device))


def student_network(student: Any) -> nn.Module | None:
    """The student network of a student side (``side.student``), or the network itself when given bare."""
    return getattr(student, "student", student)


SYNTHESIZERS: Registry[type[Synthesizer]] = Registry("synthesis method")


def build_synthesizer(
    method: str,
    teacher: Classifier,
    info: DatasetInfo,
    cfg: Mapping[str, Any] | SynthesisConfig | None = None,
    engine: Engine | None = None,
    seed: int = 0,
) -> Synthesizer:
    return SYNTHESIZERS.get(method)(teacher, info, cfg, engine, seed)


def serving(task: str) -> list[str]:
    """The methods that serve a ``task`` teacher, as commands name them (from the index: for error lines)."""
    online_only = set(INDEX["online method"]) - set(INDEX["synthesis method"])
    return [f"dfkd distill --online {m}" if m in online_only else m for m in index_serving(task)]


"""The Synthesizer interface and the shared machinery of every inversion method.

A synthesizer only has to :meth:`Synthesizer.synthesize` one round of images (optionally against the current
student, for adversarial methods) and report its state for resuming. Methods are registered classes in
:data:`SYNTHESIZERS`; they declare their defaults and differ mostly in loss weights and in *what* is optimised
(pixels, a generator, a generator plus latents). The teacher is frozen and in eval mode throughout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from dfkd_common.augment_ops import augment_config, build_augment
from dfkd_common.data import DatasetInfo
from dfkd_common.engine import Engine, check_finite
from dfkd_common.errors import DfkdError
from dfkd_common.models import Classifier
from dfkd_common.models.hooks import BNStats, Penultimate
from dfkd_common.params import check_params, merge
from dfkd_common.registry import Registry
from dfkd_common.synthesis.losses import TERMS, Context, weighted_sum


@dataclass
class SynthResult:
    """One round's output: images float in [0, 1] on the CPU, their labels, and loss values for logging."""

    images: torch.Tensor
    labels: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


class Synthesizer(ABC):
    """Base class: owns the frozen teacher, its BN/feature hooks, augmentation and the config."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {
        "batch_size": 256,
        "g_steps": 100,
        "weights": {},
        "bn_momentum": 0.0,
        "augment": {"crop_pad": 4, "flip": False, "jitter": 0.0},
        "adv_kl_order": "teacher_student",
    }
    #: expected types of params whose default is None (see :func:`dfkd_common.params.check_params`)
    param_types: ClassVar[dict[str, type]] = {}
    needs_student: ClassVar[bool] = False

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        """Every param this method accepts, with its default (the base's, overridden by the method's)."""
        return merge(Synthesizer.defaults, cls.defaults)

    def __init__(
        self,
        teacher: Classifier,
        info: DatasetInfo,
        cfg: dict[str, Any] | None = None,
        engine: Engine | None = None,
        seed: int = 0,
    ) -> None:
        defaults = self.param_defaults()
        check_params(cfg or {}, defaults, self.name, types=self.param_types)
        self.cfg = merge(defaults, cfg)
        weights = self.cfg["weights"]  # open key set (any registered term), but every value is a number
        check_params(weights, dict.fromkeys(weights, 0.0), self.name, prefix="weights.")
        unknown_terms = sorted(set(weights) - set(TERMS.names()))
        if unknown_terms:
            raise DfkdError(f"{self.name}: weights.{unknown_terms[0]}: no such loss term "
                            f"(known: {', '.join(TERMS.names())})")
        self.engine = engine or Engine.create()
        self.info = info
        self.teacher = self.engine.model(teacher).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.weights: dict[str, float] = {k: float(v) for k, v in self.cfg["weights"].items()}
        self.bn = BNStats(self.teacher, float(self.cfg["bn_momentum"])) if self.weights.get("bn") else None
        if self.bn is not None:
            self.bn.enable(False)
        self.penultimate = Penultimate(self.teacher)
        self.augment = build_augment(info.image_size, augment_config(self.cfg["augment"]))
        self.gen = torch.Generator().manual_seed(seed)
        self.device = self.engine.device

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

    def targets(self, n: int, round_index: int) -> torch.Tensor:
        """Balanced class targets: each class n/K times (remainder rotates with the round), shuffled."""
        k = self.info.num_classes
        y = (torch.arange(n) + round_index * n) % k
        return y[torch.randperm(n, generator=self.gen)].to(self.device)

    def noise(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.device)

    def context(self, x: torch.Tensor, y: torch.Tensor | None, student: nn.Module | None = None) -> Context:
        """Augment x once, run the teacher (and the student for adversarial terms) on it."""
        xa = self.augment(x)
        xa = self.engine.images(xa)
        with self.engine.autocast():
            t_logits = self.teacher(xa)
            s_logits = student(xa) if (student is not None and self.weights.get("adv")) else None
        return Context(
            x=x,
            t_logits=t_logits.float(),
            y=y,
            s_logits=None if s_logits is None else s_logits.float(),
            t_feat=self.penultimate.value,
            bn=self.bn,
            extra={"adv_kl_order": self.cfg["adv_kl_order"], "xa": xa},
        )

    def loss(self, ctx: Context, weights: dict[str, float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        total, logs = weighted_sum(weights if weights is not None else self.weights, ctx)
        check_finite(total, f"{self.name} synthesis loss")
        logs["loss"] = float(total.detach())
        return total, logs

    def end_round(self) -> None:
        """After each round: fold the last batch statistics into the BN EMA (momentum variant)."""
        if self.bn is not None and self.cfg["bn_momentum"]:
            self.bn.update_ema()

    # -- the interface ---------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int) -> None:
        """Called before the rounds of each epoch (online: the student's epoch; offline: every round is one).

        Methods with per-epoch schedules (NAYER's generator life) act here; most need nothing.
        """
        return None

    @abstractmethod
    def synthesize(self, round_index: int, student: nn.Module | None = None) -> SynthResult:
        """Produce one round of images (against ``student`` where the method is adversarial)."""

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


SYNTHESIZERS: Registry[type[Synthesizer]] = Registry("synthesis method")


def build_synthesizer(
    method: str,
    teacher: Classifier,
    info: DatasetInfo,
    cfg: dict[str, Any] | None = None,
    engine: Engine | None = None,
    seed: int = 0,
) -> Synthesizer:
    return SYNTHESIZERS.get(method)(teacher, info, cfg, engine, seed)

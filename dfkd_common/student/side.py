"""The student side: the student network plus the modules its objective's terms own, as one object.

:class:`StudentSide` is what the distillation loop trains and what online feeds and synthesizers receive: DFAD's
generator attacks ``side.student``; a synthesizer can read a head a term trains (``side.terms["..."]``) or the
student's stage features. It

* builds the weighted terms (``weights: {kd: 1, na: 1}``, options in ``terms: {kd: {tau: 4}}``; unknown names
  and options are one error line) and knows what one step must compute for them (:attr:`needs`, :attr:`views`);
* records the student's penultimate and stage features by forward hooks, only when a term needs them;
* owns the parameter groups: the student's and those terms train with it (one optimiser, the student's LR
  schedule), plus the optimisers some terms keep for themselves (DFND's transition matrix: Adam, no schedule);
* is resumed whole (``state_dict``: student and term modules), while only ``side.student`` goes into the
  student checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dfkd_common.config import spec
from dfkd_common.errors import DfkdError
from dfkd_common.loops.common import make_optimizer
from dfkd_common.models import Classifier
from dfkd_common.models.hooks import FeatureHooks, Penultimate, stage_outputs
from dfkd_common.params import check_weighted_terms
from dfkd_common.student.base import STUDENT_TERMS, StudentStep, TermSetup


def check_objective(weights: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, float]:
    """Check ``weights`` and ``terms`` without building anything (the stage calls it before any work): registered
    names, numeric weights, known options of the right types. Returns the non-zero weights."""
    weighted = check_weighted_terms(
        "distill", weights, options, "student term", STUDENT_TERMS.names(),
        lambda name: spec(STUDENT_TERMS.get(name).Options))
    active = {k: v for k, v in weighted.items() if v}
    if not active:
        raise DfkdError("distill: every student term has weight 0: the student would learn nothing")
    return active


class StudentSide(nn.Module):
    """The student and its objective's terms (see the module docstring)."""

    def __init__(self, student: Classifier, weights: Mapping[str, Any], options: Mapping[str, Any],
                 setup: TermSetup) -> None:
        super().__init__()
        self.student = student
        self.weights = check_objective(weights, options)
        self.terms = nn.ModuleDict({name: STUDENT_TERMS.get(name)(dict(options.get(name) or {}), setup)
                                    for name in self.weights})
        #: what one step must compute for the active terms, and how many views of each image
        self.needs: frozenset[str] = frozenset().union(*(t.needs for t in self.terms.values()))
        self.views: int = max(t.views for t in self.terms.values())
        self.stage_paths: list[str] = []
        self._features: FeatureHooks | None = None
        self._penultimate: Penultimate | None = None
        if "s_stages" in self.needs:
            self.stage_paths = [s.path for s in stage_outputs(student, setup.channels, setup.image_size)]
            self._features = FeatureHooks(student, self.stage_paths)
        if "s_feat" in self.needs:
            self._penultimate = Penultimate(student)

    def provider(self, capability: str) -> Any:
        """The term that provides ``capability`` (:attr:`StudentTerm.provides`), or None: how a synthesizer gets
        what it needs from the student side without knowing which term, or its options, provides it."""
        return next((t for t in self.terms.values() if capability in t.provides), None)

    @property
    def part_time(self) -> bool:
        """Some term is off for part of training (:attr:`StudentTerm.part_time`)."""
        return any(t.part_time for t in self.terms.values())

    # -- objective ------------------------------------------------------------------------------------
    def describe(self) -> str:
        """The objective as a sum, e.g. ``1*kd(tau=4.0) + 1*na(theta_lr=0.001)``."""
        return " + ".join(f"{w:g}*{self.terms[k].describe()}" for k, w in self.weights.items())

    def features(self) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """The student's penultimate and stage features of its last forward (where a term needs them)."""
        feat = self._penultimate.value if self._penultimate is not None else None
        stages = dict(self._features.features) if self._features is not None else {}
        return feat, stages

    def objective(self, step: StudentStep) -> tuple[torch.Tensor, dict[str, float]]:
        """``sum(weight * term(step))`` and each term's value for the logs."""
        total = step.s_logits.new_zeros((), dtype=torch.float32)
        logs: dict[str, float] = {}
        for name, w in self.weights.items():
            value = self.terms[name](step)
            logs[name] = float(value.detach())
            total = total + w * value
        return total, logs

    # -- optimisation ---------------------------------------------------------------------------------
    def optimizers(self, name: str, lr: float, weight_decay: float) -> tuple[torch.optim.Optimizer,
                                                                              list[torch.optim.Optimizer]]:
        """The student's optimiser (student parameters, then the term groups that train with it) and the terms'
        own optimisers. Create once, after the side moved to its device."""
        own = [opt for opt in (t.optimizer() for t in self.terms.values()) if opt is not None]
        owned = {id(p) for opt in own for g in opt.param_groups for p in g["params"]}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in owned]}
                  for t in self.terms.values() for g in t.param_groups()]
        groups = [g for g in groups if g["params"]]
        params: Any = list(self.student.parameters())
        if groups:
            params = [{"params": params}, *groups]
        return make_optimizer(params, name, lr, weight_decay), own

    def terms_state(self) -> dict[str, Any]:
        """The term modules' state, for the resume state (the student's own goes separately)."""
        return self.terms.state_dict()

    def load_terms_state(self, state: dict[str, Any]) -> None:
        self.terms.load_state_dict(state)

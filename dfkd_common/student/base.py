"""The student side's terms: registered objectives over one student step, composed by weight.

A :class:`StudentTerm` is one summand of the student's objective (KD, CE on bank labels, DFAD's L1, DFND's noise
adaptation, ...). It declares

* ``needs``: what the step must compute for it (:data:`NEEDS`: the student's and teacher's logits, their
  penultimate features, their stage features, the bank labels); the loop computes the union of the active terms'
  needs once per step, and nothing more;
* ``views``: how many independently augmented views of every bank image a batch must hold (2 for a term that
  needs positive pairs); the loop makes the maximum over the active terms;
* ``Options``: a frozen dataclass of its options (their defaults and types, :mod:`dfkd_common.config`), parsed
  when the term is built (an unknown one or a wrong type is one error line);
* modules it trains: parameters train with the student's optimiser (:meth:`StudentTerm.param_groups`, an own
  learning rate allowed) or with an optimiser of the term's own (:meth:`StudentTerm.optimizer`). They are part of
  the run's resume state, never of the student's checkpoint.

A term returns the value to minimise; :class:`~dfkd_common.student.side.StudentSide` sums ``weight * term``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from dfkd_common.config import parse, values
from dfkd_common.geometry import Size
from dfkd_common.models import Classifier
from dfkd_common.registry import Registry

#: what a term may need from a step
NEEDS = frozenset({"s_logits", "t_logits", "labels", "s_feat", "t_feat", "s_stages", "t_stages"})


@dataclass(frozen=True)
class NoOptions:
    """The options of a term that has none."""


@dataclass
class StudentStep:
    """One student step's tensors. With k views, every bank image appears k times (view-major: rows
    ``v * B .. (v + 1) * B`` are view ``v``), each independently augmented; ``labels`` are repeated likewise."""

    x: torch.Tensor
    labels: torch.Tensor  # bank labels; -1 where a row has none
    s_logits: torch.Tensor
    t_logits: torch.Tensor | None = None
    s_feat: torch.Tensor | None = None  # the student's penultimate features
    t_feat: torch.Tensor | None = None
    s_stages: dict[str, torch.Tensor] = field(default_factory=dict)  # stage output by module path
    t_stages: dict[str, torch.Tensor] = field(default_factory=dict)
    views: int = 1
    progress: float = 0.0  # the epoch's start as a fraction of all epochs (terms on for part of training)


@dataclass
class TermSetup:
    """What a term may need when it is built: the networks (e.g. their stage shapes), the teacher's accuracy and
    the task (whose KD reduction the ``kd`` term uses)."""

    teacher: Classifier
    student: Classifier
    channels: int
    image_size: Size
    teacher_accuracy: float | None = None  # measured on the teacher's test split (its checkpoint), if known
    task: str = "classification"


class StudentTerm(nn.Module):
    """Base of every student term (see the module docstring)."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    needs: ClassVar[frozenset[str]] = frozenset({"s_logits", "t_logits"})
    views: ClassVar[int] = 1
    #: capabilities this term offers to others through the student side (``rot``: the rotation head a CSD
    #: synthesizer attacks); :meth:`~dfkd_common.student.side.StudentSide.provider` hands the term over by name
    provides: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, options: dict[str, Any], setup: TermSetup) -> None:
        super().__init__()
        self.opts: Any = parse(self.Options, options, f"student term {self.name}")

    def forward(self, step: StudentStep) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def part_time(self) -> bool:
        """Whether the term is switched off for part of training, leaving the modules it trains without gradients
        in those steps (DDP must then look for unused parameters). Terms with such a schedule say so."""
        return False

    def describe(self) -> str:
        """``name(option=value, ...)`` for the run's printed objective."""
        shown = ", ".join(f"{k}={v}" for k, v in values(self.opts).items() if v is not None)
        return f"{self.name}({shown})" if shown else self.name

    def optimizer(self) -> torch.optim.Optimizer | None:
        """An optimiser of the term's own for its parameters (stepped every student step, no LR schedule), or
        None: its parameters then train with the student (:meth:`param_groups`)."""
        return None

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups to add to the student's optimiser (``{"params": [...], "lr": ...}``; lr optional).

        Parameters an own :meth:`optimizer` steps are left out of these by the student side.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params}] if params else []


STUDENT_TERMS: Registry[type[StudentTerm]] = Registry("student term")


def register(cls: type[StudentTerm]) -> type[StudentTerm]:
    """Class decorator: register a term under its ``name``."""
    unknown = cls.needs - NEEDS
    if unknown:
        raise ValueError(f"student term {cls.name} needs {sorted(unknown)}, not among {sorted(NEEDS)}")
    return STUDENT_TERMS.register(cls.name)(cls)

"""The student side: registered terms (one module each; importing this package registers them in
:data:`STUDENT_TERMS`) and :class:`StudentSide`, the student plus what its terms train."""

from dfkd_common.student import ce, dda, kd, l1, noise_adaptation, relation  # noqa: F401  (registration side effects)
from dfkd_common.student.base import NEEDS, STUDENT_TERMS, StudentStep, StudentTerm, TermSetup, register
from dfkd_common.student.side import StudentSide, check_objective

__all__ = ["NEEDS", "STUDENT_TERMS", "StudentSide", "StudentStep", "StudentTerm", "TermSetup", "check_objective",
           "register"]

"""The student side: :class:`StudentSide` (the student plus what its terms train) and the term registry
:data:`STUDENT_TERMS`; each term is its own module, imported when named (:data:`dfkd_common.index.INDEX`)."""

from dfkd_common.student.base import NEEDS, STUDENT_TERMS, StudentStep, StudentTerm, TermSetup, register
from dfkd_common.student.side import StudentSide, check_objective

__all__ = ["NEEDS", "STUDENT_TERMS", "StudentSide", "StudentStep", "StudentTerm", "TermSetup", "check_objective",
           "register"]

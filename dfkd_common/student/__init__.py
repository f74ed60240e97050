"""Student losses, one module each; importing this package registers them in :data:`STUDENT_LOSSES`."""

from dfkd_common.student import kd, l1, noise_adaptation  # noqa: F401  (registration side effects)
from dfkd_common.student.base import STUDENT_LOSSES, Batch, StudentLoss

__all__ = ["STUDENT_LOSSES", "Batch", "StudentLoss"]

"""Tasks: what is specific to the kind of prediction a teacher makes (classification now, segmentation next).

See :mod:`dfkd_common.tasks.base` for the interface; each task is one module, imported when named.
"""

from dfkd_common.tasks.base import TASKS, Column, Task, get_task

__all__ = ["TASKS", "Column", "Task", "get_task"]

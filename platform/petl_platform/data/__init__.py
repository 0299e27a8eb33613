"""Offline tasks: Debian data packages, fonts, scikit-learn and deterministic generators."""

from .registry import check_task_name, get_task, list_tasks, register_task
from .task import SPLITS, Task
from .transforms import Pixels, data_config, make_transform, task_tensors, to_tensors

__all__ = ["SPLITS", "Pixels", "Task", "check_task_name", "get_task", "list_tasks", "register_task",
           "data_config", "make_transform", "task_tensors", "to_tensors"]

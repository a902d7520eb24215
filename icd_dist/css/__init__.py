"""The continual-segmentation protocol: class names, tasks, label remapping, selection."""

from icd_dist.css.classes import DATASETS, IGNORE_INDEX, DatasetSpec, get_dataset
from icd_dist.css.remap import apply_lut, eval_lut, train_lut
from icd_dist.css.selection import images_per_step, is_selected, presence_matrix, selection_mask
from icd_dist.css.tasks import Task, get_task, known_tasks, task_from_config

__all__ = [
    "DATASETS", "IGNORE_INDEX", "DatasetSpec", "Task", "apply_lut", "get_dataset", "get_task",
    "images_per_step", "is_selected", "known_tasks", "presence_matrix", "selection_mask",
    "task_from_config", "eval_lut", "train_lut",
]

"""joint: every class in one offline step with CE, the upper bound."""

from __future__ import annotations

from icd_dist.config import Config, ConfigError, SearchDim
from icd_dist.css.tasks import Task
from icd_dist.methods.base import Method


class Joint(Method):
    """Every class in one offline step with CE (upper bound)."""

    name = "joint"
    offline = True
    allowed_seg = ("ce",)
    uses_teacher = False
    default_mib_init = False

    def __init__(self, cfg: Config, task: Task, step: int):
        if task.num_steps != 1:
            raise ConfigError("method.name", f"joint trains every class in one step; use "
                              f"task.name=offline (task {task.name!r} has {task.num_steps} "
                              f"steps)")
        super().__init__(cfg, task, step)

    @classmethod
    def search_space(cls, cfg: Config) -> tuple[SearchDim, ...]:
        """Nothing: joint has no incremental step to tune."""
        return ()

"""The incremental task registry: which classes each step of a task learns.

A task "A-B" on a dataset with N classes (background included) learns background and
classes 1..A at step 0, then B new classes per step in natural order until N-1 (MiB, PLOP,
RCIL). "offline" learns every class in one step (the joint upper bound). A task may also be
an explicit list of class-id lists, e.g. [[0, 1, 2], [5], [3, 4]].

The model's logits follow the task's class order (the concatenation of its steps): for
natural-order tasks the logit index of a class is its id. `Task.index_of` maps ids to
logit indices for any order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

from icd_dist.config import Config, ConfigError
from icd_dist.css.classes import DatasetSpec, generic_spec, get_dataset

# Registered task names per dataset, each "A-B" in the sense above.
REGISTERED_TASKS: dict[str, tuple[str, ...]] = {
    "voc": ("19-1", "15-5", "15-1", "10-1", "5-3"),
    "ade20k": ("100-50", "100-10", "100-5", "50-50"),
    "camvid": ("6-5", "6-1"),
}
OFFLINE = "offline"
SETTINGS = ("overlap", "disjoint")


@dataclass(frozen=True)
class Task:
    """An incremental schedule on one dataset: the classes new at every step."""

    dataset: str
    name: str
    steps: tuple[tuple[int, ...], ...]
    setting: str = "overlap"
    spec: DatasetSpec = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.spec is None:
            object.__setattr__(self, "spec", get_dataset(self.dataset))

    @property
    def num_steps(self) -> int:
        """Number of steps T."""
        return len(self.steps)

    def classes_at(self, step: int) -> tuple[int, ...]:
        """C_t: the class ids new at `step`."""
        self._check_step(step)
        return self.steps[step]

    def seen_classes(self, step: int) -> tuple[int, ...]:
        """C_{0:t}: the class ids seen up to and including `step`, in the task's order."""
        self._check_step(step)
        return tuple(c for s in self.steps[: step + 1] for c in s)

    def old_classes(self, step: int) -> tuple[int, ...]:
        """C_{0:t-1}: the class ids seen before `step` (empty at step 0)."""
        self._check_step(step)
        return tuple(c for s in self.steps[:step] for c in s)

    def num_seen(self, step: int) -> int:
        """|C_{0:t}|: the number of logits of the model after `step`."""
        return len(self.seen_classes(step))

    @cached_property
    def class_order(self) -> tuple[int, ...]:
        """Every class id of the task in logit order."""
        return tuple(c for s in self.steps for c in s)

    def index_of(self, class_id: int) -> int:
        """The logit index of `class_id` (its id itself for natural-order tasks)."""
        return self.class_order.index(class_id)

    def class_name(self, class_id: int) -> str:
        """The dataset's name of `class_id`."""
        return self.spec.class_names[class_id]

    def to_dict(self) -> dict:
        """JSON-ready description: dataset, task, setting, steps with their classes."""
        return {
            "dataset": self.dataset,
            "task": self.name,
            "setting": self.setting,
            "steps": [{"step": t, "classes": list(c)} for t, c in enumerate(self.steps)],
        }

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"task {self.name!r} has steps 0..{self.num_steps - 1}, not {step}")


def known_tasks(dataset: str) -> tuple[str, ...]:
    """The task names registered for `dataset` (offline included)."""
    return (*REGISTERED_TASKS.get(dataset, ()), OFFLINE)


def _a_b_steps(first: int, increment: int, num_classes: int) -> tuple[tuple[int, ...], ...]:
    steps = [tuple(range(0, first + 1))]
    start = first + 1
    while start < num_classes:
        steps.append(tuple(range(start, min(start + increment, num_classes))))
        start += increment
    return tuple(steps)


def _registered_steps(spec: DatasetSpec, name: str) -> tuple[tuple[int, ...], ...]:
    dataset, num_classes = spec.name, spec.num_classes
    if name == OFFLINE:
        return (tuple(range(num_classes)),)
    if dataset not in REGISTERED_TASKS:
        # datasets without a protocol (synthetic, user pairs): any "A-B" that fits
        m = re.fullmatch(r"(\d+)-(\d+)", name)
        if m and 0 < int(m.group(1)) < num_classes - 1 and int(m.group(2)) > 0:
            return _a_b_steps(int(m.group(1)), int(m.group(2)), num_classes)
        raise ConfigError("task.name", f"task {name!r} does not fit dataset {dataset!r} with "
                          f"{num_classes} classes; use A-B with 0 < A < {num_classes - 1}, "
                          "offline, or an explicit list of class-id lists")
    if name not in REGISTERED_TASKS.get(dataset, ()):
        raise ConfigError(
            "task.name",
            f"unknown task {name!r} for dataset {dataset!r}; known tasks: "
            f"{', '.join(known_tasks(dataset))} (or an explicit list of class-id lists)",
        )
    first, increment = (int(x) for x in name.split("-"))
    return _a_b_steps(first, increment, num_classes)


def validate_steps(steps: Sequence[Sequence[int]], num_classes: int,
                   key: str = "task.steps") -> tuple[tuple[int, ...], ...]:
    """Check an explicit task (step 0 holds background 0, ids in range, no class twice, no
    empty step) and return it as sorted tuples; raises ConfigError naming `key`."""
    if not steps:
        raise ConfigError(key, "a task needs at least one step")
    seen: set[int] = set()
    out = []
    for t, step in enumerate(steps):
        if isinstance(step, (str, bytes)) or not isinstance(step, Sequence) or not step:
            raise ConfigError(key, f"step {t} must be a non-empty list of class ids, got {step!r}")
        for c in step:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
                raise ConfigError(key, f"step {t}: class id {c!r} is not in 0..{num_classes - 1}")
            if c in seen:
                raise ConfigError(key, f"step {t}: class {c} is already learned in an earlier "
                                  "step or listed twice")
            seen.add(c)
        out.append(tuple(sorted(step)))
    if 0 not in out[0]:
        raise ConfigError(key, "step 0 must include the background class 0")
    return tuple(out)


def get_task(dataset: str | DatasetSpec, task: str | Sequence[Sequence[int]],
             setting: str = "overlap") -> Task:
    """The Task for a registered name, an explicit list of class-id lists, or such a list
    written as JSON text (as on the command line). `dataset` is a registered name or the
    DatasetSpec of another dataset (synthetic, pairs; any "A-B" name fits those)."""
    spec = dataset if isinstance(dataset, DatasetSpec) else get_dataset(dataset)
    if setting not in SETTINGS:
        raise ConfigError("task.setting", f"unknown setting {setting!r}; allowed: "
                          f"{', '.join(SETTINGS)}")
    if isinstance(task, str) and task.lstrip().startswith("["):
        try:
            task = json.loads(task)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                "task", f"{task!r} is not a valid JSON list of lists: {exc}"
            ) from None
    if isinstance(task, str):
        return Task(spec.name, task, _registered_steps(spec, task), setting, spec)
    steps = validate_steps(task, spec.num_classes)
    name = "-".join(str(len(s)) for s in steps)
    return Task(spec.name, f"custom[{name}]", steps, setting, spec)


def task_from_config(cfg: Config, spec: DatasetSpec | None = None) -> Task:
    """The Task that a config's `data.dataset` and `task.*` keys describe, on `spec` (from
    the shard manifest) when given; synthetic data defaults to data.synthetic.classes."""
    if spec is None:
        if cfg.data.dataset == "synthetic":
            spec = generic_spec("synthetic", cfg.data.synthetic.classes)
        else:
            spec = get_dataset(cfg.data.dataset)
    if cfg.task.steps is not None:
        task = get_task(spec, [list(s) for s in cfg.task.steps], cfg.task.setting)
        return Task(task.dataset, cfg.task.name, task.steps, task.setting, spec)
    return get_task(spec, cfg.task.name, cfg.task.setting)

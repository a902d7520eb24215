"""Which training and evaluation images a step of a task selects, from the classes present in
each label map.

Training images of a step (`selection_mask`), by the task's setting:
- overlap: the image has a pixel of a class new at this step (background does not count);
- disjoint: that, and every class in the image is old, current, background 0 or 255
  (so an image showing a future class is left out).

Which evaluation (test) images a step is scored on, `eval_selection_mask`:
- the image has a pixel of a class seen up to this step other than background 0; an image
  whose only labels are 0, 255 or classes of later steps is left out.

These are the rules of MiB's `filter_images` (MiB and PLOP dataset/utils.py), vectorised: a
presence matrix (images x classes) is built once and every step is a couple of boolean
reductions over it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from icd_dist.css.classes import IGNORE_INDEX
from icd_dist.css.tasks import SETTINGS, Task


def presence_matrix(class_sets: Sequence[Iterable[int]], num_classes: int) -> np.ndarray:
    """Bool matrix (num_images, num_classes): True where an image has a pixel of that class.
    255 is skipped; an id >= num_classes raises ValueError naming the image's position."""
    presence = np.zeros((len(class_sets), num_classes), dtype=bool)
    for i, classes in enumerate(class_sets):
        ids = [c for c in classes if c != IGNORE_INDEX]
        bad = [c for c in ids if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"image {i}: class ids {bad} outside 0..{num_classes - 1}")
        presence[i, ids] = True
    return presence


def selection_mask(presence: np.ndarray, task: Task, step: int,
                   setting: str | None = None) -> np.ndarray:
    """Bool vector over images: which ones `step` trains on (setting defaults to the task's)."""
    setting = setting or task.setting
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; allowed: {', '.join(SETTINGS)}")
    current = [c for c in task.classes_at(step) if c != 0]
    selected = presence[:, current].any(axis=1) if current else np.zeros(len(presence), bool)
    if setting == "disjoint":
        allowed = np.zeros(presence.shape[1], dtype=bool)
        allowed[list(task.seen_classes(step))] = True
        allowed[0] = True
        selected &= ~presence[:, ~allowed].any(axis=1)
    return selected


def eval_selection_mask(presence: np.ndarray, task: Task, step: int) -> np.ndarray:
    """Bool vector over evaluation images: which ones `step` is scored on.

    An image is kept when it has a pixel of a class seen up to `step` (steps 0..step) other
    than background 0. This is MiB's and PLOP's test set: their run.py `get_dataset` builds it
    with labels = every seen class and no old labels, so `filter_images` (overlap=True,
    0 removed from the labels) keeps an image when any id in it, 0 and 255 aside, is seen.
    The setting (overlap/disjoint) does not matter: the test set is filtered the same way."""
    seen = [c for c in task.seen_classes(step) if c != 0]
    if not seen:
        return np.zeros(len(presence), dtype=bool)
    return presence[:, seen].any(axis=1)


def is_selected(classes_present: Iterable[int], task: Task, step: int,
                setting: str | None = None) -> bool:
    """Whether one image, with these class ids present, is a training image of `step`."""
    presence = presence_matrix([list(classes_present)], task.spec.num_classes)
    return bool(selection_mask(presence, task, step, setting)[0])


def images_per_step(class_sets: Sequence[Iterable[int]], task: Task,
                    setting: str | None = None) -> list[int]:
    """Number of training images each step of `task` selects."""
    presence = presence_matrix(class_sets, task.spec.num_classes)
    return [int(selection_mask(presence, task, t, setting).sum()) for t in range(task.num_steps)]

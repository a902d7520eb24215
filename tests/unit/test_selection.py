"""Overlapped and disjoint image selection on hand-made class sets."""

import numpy as np
import pytest

from icd_dist.css import get_task, images_per_step, is_selected, presence_matrix, selection_mask

TASK = get_task("voc", "15-1")


def test_overlap_keeps_images_with_future_classes():
    assert is_selected([0, 3, 18], TASK, 0, "overlap")  # future class 18 allowed
    assert is_selected([0, 16, 255], TASK, 1, "overlap")
    assert not is_selected([0, 3, 255], TASK, 1, "overlap")  # no current class


def test_disjoint_rejects_future_classes():
    assert not is_selected([0, 3, 18], TASK, 0, "disjoint")
    assert is_selected([0, 3, 255], TASK, 0, "disjoint")
    assert is_selected([0, 2, 16], TASK, 1, "disjoint")  # old + current is fine
    assert not is_selected([16, 17], TASK, 1, "disjoint")  # 17 is a future class at step 1
    assert is_selected([16, 17], TASK, 2, "disjoint")


def test_background_alone_is_never_selected():
    assert not is_selected([0], TASK, 0, "overlap")
    assert not is_selected([0, 255], TASK, 0, "disjoint")


def test_counts_per_step_on_a_small_set():
    class_sets = [
        [0, 1, 2],        # step 0 only
        [0, 5, 16],       # overlap: steps 0 and 1; disjoint: step 1 only
        [0, 17, 255],     # step 2
        [0, 16, 17],      # overlap: steps 1, 2; disjoint: step 2
        [0, 255],         # nothing
        [20],             # step 5
    ]
    assert images_per_step(class_sets, TASK, "overlap") == [2, 2, 2, 0, 0, 1]
    assert images_per_step(class_sets, TASK, "disjoint") == [1, 1, 2, 0, 0, 1]


def test_mask_matches_scalar_rule():
    rng = np.random.default_rng(0)
    class_sets = [sorted(set(rng.integers(0, 21, size=rng.integers(1, 5)).tolist()))
                  for _ in range(200)]
    presence = presence_matrix(class_sets, 21)
    for setting in ("overlap", "disjoint"):
        for step in range(TASK.num_steps):
            mask = selection_mask(presence, TASK, step, setting)
            current = set(TASK.classes_at(step)) - {0}
            allowed = set(TASK.seen_classes(step)) | {0, 255}
            for i, cs in enumerate(class_sets):
                expect = bool(current & set(cs))
                if setting == "disjoint":
                    expect = expect and set(cs) <= allowed
                assert mask[i] == expect


def test_presence_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"image 1: class ids \[30\]"):
        presence_matrix([[0], [30]], 21)

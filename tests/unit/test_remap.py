"""Label remapping at step t on hand-made label maps (background shift, 255 kept)."""

import numpy as np
import pytest
import torch

from icd_dist.css import apply_lut, eval_lut, get_task, train_lut

# VOC 15-1: step 0 = 0..15, step 1 = 16, step 2 = 17, ...
LABELS = np.array([
    [0, 1, 15, 255],
    [16, 17, 20, 255],
    [3, 16, 0, 18],
], dtype=np.uint8)


def test_train_labels_step0_hide_future_classes():
    task = get_task("voc", "15-1")
    out = apply_lut(train_lut(task, 0), LABELS)
    assert out.tolist() == [[0, 1, 15, 255], [0, 0, 0, 255], [3, 0, 0, 0]]


def test_train_labels_step1_background_shift():
    task = get_task("voc", "15-1")
    out = apply_lut(train_lut(task, 1), LABELS)
    # old classes (1, 3, 15) become background, future (17, 18, 20) too; 16 kept; 255 kept
    assert out.tolist() == [[0, 0, 0, 255], [16, 0, 0, 255], [0, 16, 0, 0]]


def test_test_labels_keep_seen_classes():
    task = get_task("voc", "15-1")
    out = apply_lut(eval_lut(task, 2), LABELS)
    assert out.tolist() == [[0, 1, 15, 255], [16, 17, 0, 255], [3, 16, 0, 0]]
    out = apply_lut(eval_lut(task, 5), LABELS)
    assert out.tolist() == LABELS.tolist()


def test_torch_and_numpy_agree_and_torch_gives_int64():
    task = get_task("voc", "15-5")
    lut = train_lut(task, 1)
    as_np = apply_lut(lut, LABELS)
    as_torch = apply_lut(lut, torch.from_numpy(LABELS))
    assert as_torch.dtype == torch.int64
    assert as_np.dtype == np.uint8
    assert as_torch.numpy().tolist() == as_np.tolist()
    assert apply_lut(lut, torch.from_numpy(LABELS).long()).tolist() == as_np.tolist()


def test_ignore_background_option():
    # as MiB's dataset/ade.py: id 0 is background in training, ignored only at test
    task = get_task("ade20k", "100-50")
    labels = np.array([[0, 5, 120, 255]], dtype=np.uint8)
    assert apply_lut(train_lut(task, 1), labels).tolist() == [[0, 0, 120, 255]]
    assert apply_lut(train_lut(task, 1, ignore_background=True), labels).tolist() == \
        [[0, 0, 120, 255]]
    assert apply_lut(eval_lut(task, 0, ignore_background=True), labels).tolist() == \
        [[255, 5, 0, 255]]


def test_explicit_order_maps_ids_to_logit_indices():
    task = get_task("voc", [[0, 7, 9], [2]])
    labels = np.array([[0, 7, 9, 2, 4, 255]], dtype=np.uint8)
    assert apply_lut(eval_lut(task, 1), labels).tolist() == [[0, 1, 2, 3, 0, 255]]
    assert apply_lut(train_lut(task, 1), labels).tolist() == [[0, 0, 0, 3, 0, 255]]


@pytest.mark.parametrize("as_torch", [False, True])
def test_ids_outside_dataset_raise(as_torch):
    task = get_task("voc", "15-1")
    labels = np.array([[0, 21, 200]], dtype=np.uint8)
    if as_torch:
        labels = torch.from_numpy(labels)
    with pytest.raises(ValueError, match=r"label ids \[21, 200\]"):
        apply_lut(train_lut(task, 0), labels, source="sample x")

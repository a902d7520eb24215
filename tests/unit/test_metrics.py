"""Metrics against hand-computed confusion matrices."""

import pytest
import torch

from icd_dist.train.metrics import (
    ConfusionMatrix,
    format_per_class_table,
    harmonic_iou,
    step_metrics,
)

# 4 classes; rows = ground truth, cols = prediction.
PRED = torch.tensor([0, 0, 1, 1, 1, 2, 0, 3, 3, 1, 2])
GT = torch.tensor([0, 0, 1, 1, 0, 2, 2, 255, 255, 1, 255])


def test_confusion_counts_by_hand():
    cm = ConfusionMatrix(4)
    cm.update(PRED, GT)
    expected = torch.tensor([
        [2, 1, 0, 0],  # gt 0: two right, one predicted as 1
        [0, 3, 0, 0],  # gt 1: three right
        [1, 0, 1, 0],  # gt 2: one right, one as 0
        [0, 0, 0, 0],  # gt 3: absent (pixels predicted 3 were 255 = ignored)
    ])
    assert torch.equal(cm.matrix, expected)


def test_iou_and_miou_by_hand_with_absent_class():
    cm = ConfusionMatrix(4)
    cm.update(PRED, GT)
    iou = cm.iou()
    # class 0: tp 2, fp 1 (gt2->0), fn 1 -> 2/4; class 1: tp 3, fp 1, fn 0 -> 3/4;
    # class 2: tp 1, fp 0, fn 1 -> 1/2; class 3: no ground truth -> None
    assert iou == pytest.approx([0.5, 0.75, 0.5, None])
    m = step_metrics(cm, ["bg", "a", "b", "c"], num_old=2)
    assert m.miou_old == pytest.approx((0.5 + 0.75) / 2)
    assert m.miou_new == pytest.approx(0.5)  # class 3 has no ground truth: not averaged
    assert m.miou_all == pytest.approx((0.5 + 0.75 + 0.5) / 3)
    assert m.hiou == pytest.approx(2 * 0.625 * 0.5 / 1.125)
    assert m.per_class_iou == {"bg": 0.5, "a": 0.75, "b": 0.5, "c": None}
    assert m.pixel_accuracy == pytest.approx(6 / 8)


def test_predicted_but_absent_class_costs_the_present_ones():
    # class 1 never in ground truth but predicted: it lowers class 0's IoU, is not averaged
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 0, 0, 0]))
    m = step_metrics(cm, ["bg", "x"], num_old=1)
    assert m.per_class_iou == {"bg": 0.5, "x": None}
    assert m.miou_all == pytest.approx(0.5)
    assert m.miou_new is None and m.hiou is None


def test_step0_has_no_new_classes():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    m = step_metrics(cm, ["bg", "a", "b"], num_old=3)
    assert m.miou_new is None and m.hiou is None
    assert m.miou_old == m.miou_all


def test_sum_over_two_workers_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (2, 8, 9), generator=g)
    gt = torch.randint(0, 6, (2, 8, 9), generator=g)
    gt[gt == 5] = 255
    whole = ConfusionMatrix(5)
    whole.update(pred, gt)
    worker_a, worker_b = ConfusionMatrix(5), ConfusionMatrix(5)
    worker_a.update(pred[0], gt[0])
    worker_b.update(pred[1], gt[1])
    merged = worker_a.merge(worker_b)
    assert torch.equal(merged.matrix, whole.matrix)
    assert merged.iou() == whole.iou()
    # independent reference: direct counting
    ref = torch.zeros(5, 5, dtype=torch.int64)
    for p, t in zip(pred.flatten().tolist(), gt.flatten().tolist(), strict=True):
        if t != 255:
            ref[t, p] += 1
    assert torch.equal(whole.matrix, ref)


def test_all_reduce_without_process_group_is_identity():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    before = cm.matrix.clone()
    assert torch.equal(cm.all_reduce().matrix, before)


def test_all_reduce_over_a_two_process_gloo_group(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_all_reduce_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    expected = torch.tensor([[1, 1], [0, 1]])
    assert all(torch.equal(m, expected) for m in results)


def _all_reduce_worker(rank, store_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    cm = ConfusionMatrix(2)
    if rank == 0:
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    else:
        cm.update(torch.tensor([1]), torch.tensor([1]))
    cm.all_reduce()
    torch.save(cm.matrix, f"{store_path[:-len('store')]}rank{rank}.pt")
    dist.destroy_process_group()


def test_harmonic_iou():
    assert harmonic_iou(0.6, 0.3) == pytest.approx(0.4)
    assert harmonic_iou(0.0, 0.0) == 0.0
    assert harmonic_iou(0.5, None) is None


def test_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="ground-truth ids outside 0..2"):
        cm.update(torch.tensor([0]), torch.tensor([3]))
    with pytest.raises(ValueError, match="predicted ids outside"):
        cm.update(torch.tensor([4]), torch.tensor([0]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="cannot merge"):
        cm.merge(ConfusionMatrix(2))
    with pytest.raises(ValueError, match="class names"):
        step_metrics(cm, ["a"], 1)


def test_per_class_table_lists_every_class():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
    text = format_per_class_table(step_metrics(cm, ["bg", "cat", "dog"], 2), num_old=2)
    lines = text.splitlines()
    assert "bg" in lines[1] and "old" in lines[1] and "100.00" in lines[1]
    assert "cat" in lines[2] and "old" in lines[2] and " 50.00" in lines[2]
    assert "dog" in lines[3] and "new" in lines[3] and "  0.00" in lines[3]
    assert lines[-1].startswith("mIoU old 75.00")

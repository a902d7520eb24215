"""MiB and PLOP losses against hand-computed cases and float64 gradcheck."""

import math

import pytest
import torch
import torch.nn.functional as F

from icd_dist.losses import css


def logits_1px(values):
    return torch.tensor(values, dtype=torch.float64).view(1, -1, 1, 1)


def test_unbiased_ce_hand_case():
    z = [1.0, 2.0, 3.0]
    s = sum(math.exp(v) for v in z)
    logits = logits_1px(z)
    bg = css.unbiased_cross_entropy(logits, torch.tensor([[[0]]]), num_old_classes=2)
    assert bg.item() == pytest.approx(-math.log((math.exp(1) + math.exp(2)) / s))
    # a label of an old class (1) is background at step t > 0
    old = css.unbiased_cross_entropy(logits, torch.tensor([[[1]]]), num_old_classes=2)
    assert old.item() == pytest.approx(bg.item())
    new = css.unbiased_cross_entropy(logits, torch.tensor([[[2]]]), num_old_classes=2)
    assert new.item() == pytest.approx(-math.log(math.exp(3) / s))


def test_unbiased_ce_ignores_255_and_reductions():
    logits = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 3, 3))
    labels[0, 0] = 255
    per_px = css.unbiased_cross_entropy(logits, labels, 2, reduction="none")
    assert torch.all(per_px[0, 0] == 0)
    valid = labels != 255
    mean = css.unbiased_cross_entropy(logits, labels, 2)
    assert mean.item() == pytest.approx((per_px.sum() / valid.sum()).item())
    assert css.unbiased_cross_entropy(logits, labels, 2, reduction="sum").item() == \
        pytest.approx(per_px.sum().item())


def test_unbiased_ce_equals_ce_with_one_old_class():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 4, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (3, 4, 6), generator=g)
    labels[:, 0, 0] = 255
    ours = css.unbiased_cross_entropy(logits, labels, num_old_classes=1)
    ref = F.cross_entropy(logits, labels, ignore_index=255)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)


def test_unbiased_ce_gradcheck():
    logits = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[[0, 3], [2, 255], [1, 3]], [[3, 3], [0, 1], [2, 2]]])
    assert torch.autograd.gradcheck(
        lambda x: css.unbiased_cross_entropy(x, labels, 2), (logits,))


def test_unbiased_kd_hand_case():
    a = [0.5, -1.0, 2.0]  # new model: bg, old class 1, new class 2
    b = [1.0, 0.0]        # old model: bg, old class 1
    s = sum(math.exp(v) for v in a)
    q0 = math.exp(1) / (math.exp(1) + 1)
    q1 = 1 - q0
    expected = -(q0 * math.log((math.exp(0.5) + math.exp(2.0)) / s)
                 + q1 * math.log(math.exp(-1.0) / s)) / 2
    got = css.unbiased_kd(logits_1px(a), logits_1px(b))
    assert got.item() == pytest.approx(expected)
    # alpha scales the old logits before the softmax
    q0a = math.exp(2) / (math.exp(2) + 1)
    expected_a = -(q0a * math.log((math.exp(0.5) + math.exp(2.0)) / s)
                   + (1 - q0a) * math.log(math.exp(-1.0) / s)) / 2
    assert css.unbiased_kd(logits_1px(a), logits_1px(b), alpha=2.0).item() == \
        pytest.approx(expected_a)


def test_unbiased_kd_mask_and_no_new_classes():
    new = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    old = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    assert css.unbiased_kd(new, old, mask=mask).item() == 0.0
    # with no new classes it is the cross-entropy of the softmaxes / C_old
    ref = -(torch.softmax(old, 1) * torch.log_softmax(new, 1)).sum(1).mean() / 3
    assert css.unbiased_kd(new, old).item() == pytest.approx(ref.item())


def test_unbiased_kd_gradcheck():
    new = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    old = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    mask = torch.rand(2, 3, 3) > 0.3
    assert torch.autograd.gradcheck(lambda x: css.unbiased_kd(x, old, mask, 0.7), (new,))


def test_local_pod_hand_case():
    # one sample, one channel, 2x2 map; scales (1,): width-pooled then height-pooled squares
    new = torch.tensor([[[[1.0, 3.0], [2.0, 0.0]]]], dtype=torch.float64)
    old = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]]], dtype=torch.float64)
    emb_new = torch.tensor([(1 + 9) / 2, (4 + 0) / 2, (1 + 4) / 2, (9 + 0) / 2],
                           dtype=torch.float64)
    emb_old = torch.ones(4, dtype=torch.float64)
    expected = (emb_new / emb_new.norm() - emb_old / emb_old.norm()).norm()
    got = css.local_pod_distance(new, old, scales=(1,))
    assert got.item() == pytest.approx(expected.item())
    # scale 2 adds four 1x1 regions, each contributing its square twice
    emb2_new = torch.cat([emb_new, torch.tensor([1, 1, 9, 9, 4, 4, 0, 0.0],
                                                dtype=torch.float64)])
    emb2_old = torch.ones(12, dtype=torch.float64)
    expected2 = (emb2_new / emb2_new.norm() - emb2_old / emb2_old.norm()).norm()
    assert css.local_pod_distance(new, old, scales=(1, 2)).item() == \
        pytest.approx(expected2.item())


def test_local_pod_zero_for_equal_and_odd_sizes_covered():
    f = torch.randn(2, 3, 7, 5)
    assert css.local_pod([f, f * 2], [f, f * 2]).item() == pytest.approx(0.0, abs=1e-7)
    g = f.clone()
    g[..., -1, -1] += 5.0  # the last row/column (a remainder PLOP would drop) matters here
    assert css.local_pod([f], [g]).item() > 0


def test_local_pod_gradcheck():
    a = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: css.local_pod([x], [b], (1, 2)), (a,))


def test_local_pod_logits_sums_new_into_background():
    new = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    merged = css.sum_new_into_background(new, 2)
    assert torch.allclose(merged[:, 0], new[:, 0] + new[:, 2] + new[:, 3])
    assert torch.equal(merged[:, 1], new[:, 1])
    old = merged.clone()
    assert css.local_pod_logits(new, old).item() == pytest.approx(0.0, abs=1e-12)


def test_adaptive_factor():
    assert css.adaptive_factor(17, 1) == pytest.approx(math.sqrt(17))
    assert css.adaptive_factor(21, 5) == pytest.approx(math.sqrt(21 / 5))
    with pytest.raises(ValueError):
        css.adaptive_factor(3, 0)


def test_normalized_entropy_bounds():
    uniform = torch.full((1, 4, 1, 1), 0.25)
    onehot = torch.tensor([1.0, 0, 0, 0]).view(1, 4, 1, 1)
    assert css.normalized_entropy(uniform).item() == pytest.approx(1.0)
    assert css.normalized_entropy(onehot).item() == pytest.approx(0.0, abs=1e-9)


def test_entropy_histogram_median_by_hand():
    hist = css.EntropyHistogram(num_old_classes=3, bins=10)
    # class 0: counts 2 in bin 1, 2 in bin 3 -> half = 2 reached at the end of bin 1 -> 0.2
    hist.counts[0, 1] = 2
    hist.counts[0, 3] = 2
    # class 1: 4 in bin 5 -> median halfway through bin 5 -> 0.55
    hist.counts[1, 5] = 4
    th = hist.thresholds(floor=0.001)
    assert th[0].item() == pytest.approx(0.2)
    assert th[1].item() == pytest.approx(0.55)
    assert th[2].item() == pytest.approx(0.001)  # never predicted -> floor
    assert hist.thresholds(floor=0.3)[0].item() == pytest.approx(0.3)


def test_entropy_histogram_update_counts_background_pixels_only():
    old_logits = torch.tensor([[[[10.0, 0.0]], [[0.0, 10.0]]]])  # (1, 2, 1, 2): px0 -> 0, px1 -> 1
    labels = torch.tensor([[[0, 5]]])  # only px0 is background
    hist = css.EntropyHistogram(2, bins=10)
    hist.update(old_logits, labels)
    assert hist.counts.sum().item() == 1
    assert hist.counts[0, 0].item() == 1  # confident -> lowest bin


def test_pseudo_label_by_hand():
    # 1 image, 3 old classes, 4 pixels; labels: bg, bg, new class 3, ignore
    old_logits = torch.tensor([[[[9.0, 0.0, 0.0, 0.0]], [[0.0, 0.1, 9.0, 0.0]],
                                [[0.0, 0.0, 0.0, 0.0]]]])
    labels = torch.tensor([[[0, 0, 3, 255]]])
    thresholds = torch.tensor([0.1, 0.1, 0.1])
    out, weight = css.pseudo_label(labels, old_logits, thresholds)
    # px0 confident class 0; px1 near uniform -> ignored; px2 and px3 untouched
    assert out.tolist() == [[[0, 255, 3, 255]]]
    assert weight.tolist() == pytest.approx([0.5], rel=1e-5)
    logits = torch.randn(1, 4, 1, 4)
    loss = css.pseudo_label_cross_entropy(logits, out, weight)
    ce = F.cross_entropy(logits, out, ignore_index=255, reduction="none")
    assert loss.item() == pytest.approx((0.5 * ce).mean().item(), rel=1e-5)


def test_entropy_histogram_all_reduce_over_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_histogram_worker, args=(str(tmp_path),), nprocs=2, join=True)
    counts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(counts[0], counts[1])
    assert counts[0][0, 0].item() == 1 and counts[0][1, 0].item() == 1


def _histogram_worker(rank, folder):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=2)
    hist = css.EntropyHistogram(2, bins=10)
    # rank 0 sees a confident class-0 pixel, rank 1 a confident class-1 pixel
    logits = torch.tensor([[[[10.0]], [[0.0]]]]) if rank == 0 else \
        torch.tensor([[[[0.0]], [[10.0]]]])
    hist.update(logits, torch.zeros(1, 1, 1, dtype=torch.long))
    hist.all_reduce()
    torch.save(hist.counts, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()

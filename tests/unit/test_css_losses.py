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


def test_local_pod_raw_hand_case():
    # one sample, one channel, 2x2 map; scales (1,): width-pooled then height-pooled squares
    new = torch.tensor([[[[1.0, 3.0], [2.0, 0.0]]]], dtype=torch.float64)
    old = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    # embeddings: new [(1+9)/2, (4+0)/2, (1+4)/2, (9+0)/2] = [5, 2, 2.5, 4.5], old [1, 1, 1, 1]
    # PLOP compares them raw: || [4, 1, 1.5, 3.5] || = sqrt(31.5)
    assert css.local_pod_distance(new, old, scales=(1,)).item() == pytest.approx(
        math.sqrt(31.5))
    # scale 2 adds four 1x1 regions, each its square twice: [1,1,9,9,4,4,0,0] - 1 -> 148
    assert css.local_pod_distance(new, old, scales=(1, 2)).item() == pytest.approx(
        math.sqrt(31.5 + 148))
    # the L2-normalised variant is a named option (and far smaller)
    emb_new = torch.tensor([5, 2, 2.5, 4.5], dtype=torch.float64)
    normed = (emb_new / emb_new.norm() - 0.5).norm().item()
    assert css.local_pod_distance(new, old, scales=(1,), normalize=True).item() == \
        pytest.approx(normed)


def test_local_pod_is_the_batch_mean_of_per_sample_norms():
    new = torch.tensor([2.0, 3.0], dtype=torch.float64).view(2, 1, 1, 1)
    old = torch.ones(2, 1, 1, 1, dtype=torch.float64)
    # per sample: embedding [v^2, v^2] -> distances 3*sqrt(2) and 8*sqrt(2)
    assert css.local_pod_distance(new, old, scales=(1,)).item() == pytest.approx(
        (3 + 8) * math.sqrt(2) / 2)
    # local_pod: the mean over levels
    assert css.local_pod([new, new * 0 + 1], [old, old], scales=(1,)).item() == \
        pytest.approx((3 + 8) * math.sqrt(2) / 4)


def test_local_pod_regions_as_plop_drop_the_remainder():
    f = torch.rand(1, 2, 3, 3, dtype=torch.float64)
    g = f.clone()
    g[..., 2, 2] += 5.0
    # scale 2 on a 3x3 map: PLOP's windows have side 3 // 2 = 1 -> only the top-left 2x2
    assert css.local_pod_distance(f, g, scales=(2,)).item() == 0.0
    assert css.local_pod_distance(f, g, scales=(1,)).item() > 0
    # the covering split (a named option) sees it
    assert css.local_pod_distance(f, g, scales=(2,), regions="split").item() > 0
    # rows past scale * (W // scale) are dropped too; windows that do not fit are an error
    tall = torch.rand(1, 1, 8, 2, dtype=torch.float64)
    changed = tall.clone()
    changed[..., 5, :] += 1.0
    assert css.local_pod_distance(tall, changed, scales=(2,)).item() == 0.0
    with pytest.raises(ValueError, match="regions=split"):
        css.local_pod_distance(torch.rand(1, 1, 2, 8), torch.rand(1, 1, 2, 8), scales=(2,))


def test_local_pod_zero_for_equal():
    f = torch.randn(2, 3, 8, 8)
    assert css.local_pod([f, f * 2], [f, f * 2]).item() == pytest.approx(0.0, abs=1e-7)


def test_local_pod_gradcheck():
    a = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: css.local_pod([x], [b], (1, 2)), (a,))


def test_sum_new_into_background():
    new = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    merged = css.sum_new_into_background(new, 2)
    assert torch.allclose(merged[:, 0], new[:, 0] + new[:, 2] + new[:, 3])
    assert torch.equal(merged[:, 1], new[:, 1])


def test_plop_pod_hand_case_logits_factor_replaces_the_feature_factor():
    # one feature level: 1x1 map, new 2, old 1 -> embedding [4, 4] vs [1, 1] -> 3*sqrt(2)
    f_new = torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64)
    f_old = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    # logits: new [1, 2, 1] (class 2 new) -> merged [1 + 1, 2]; old [1, 1]
    # squares [4, 4] vs [1, 1], each pooled twice -> || [3, 3, 3, 3] || = 6
    l_new = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64).view(1, 3, 1, 1)
    l_old = torch.ones(1, 2, 1, 1, dtype=torch.float64)
    got = css.plop_pod([f_new], [f_old], l_new, l_old, lambda_pod=0.01,
                       lambda_pod_logits=0.0005, scales=(1,))
    assert got.item() == pytest.approx((0.01 * 3 * math.sqrt(2) + 0.0005 * 6) / 2)
    # the features' factor does not scale the logits level
    only_logits = css.plop_pod([f_old], [f_old], l_new, l_old, lambda_pod=123.0,
                               lambda_pod_logits=0.0005, scales=(1,))
    assert only_logits.item() == pytest.approx(0.0005 * 6 / 2)


def test_plop_pod_gradcheck():
    feats = [torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)]
    old = [torch.randn(2, 3, 4, 4, dtype=torch.float64)]
    logits = torch.randn(2, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    old_logits = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda f, x: css.plop_pod([f], old, x, old_logits, 0.3, 0.7), (feats[0], logits))


def test_adaptive_factor():
    assert css.adaptive_factor(17, 1) == pytest.approx(math.sqrt(17))
    assert css.adaptive_factor(21, 5) == pytest.approx(math.sqrt(21 / 5))
    with pytest.raises(ValueError):
        css.adaptive_factor(3, 0)


def test_plop_entropy_is_a_scaled_mean():
    # PLOP's entropy(): -(1/log C) * mean_c p log(p + 1e-8): uniform over 4 -> 1/4
    uniform = torch.full((1, 4, 1, 1), 0.25, dtype=torch.float64)
    assert css.plop_entropy(uniform).item() == pytest.approx(0.25, rel=1e-6)
    onehot = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64).view(1, 4, 1, 1)
    assert css.plop_entropy(onehot).item() == pytest.approx(0.0, abs=1e-7)
    # compared with the thresholds after division by log(number of seen classes)
    assert css.pseudo_entropy(uniform, 17).item() == pytest.approx(0.25 / math.log(17),
                                                                   rel=1e-6)
    assert css.normalized_entropy(uniform).item() == pytest.approx(1.0)


def _median(counts):
    return float(css.plop_median(torch.tensor(counts)))


def test_plop_median_as_written_by_hand():
    # all in bin 0 of 10: half = 5 is inside bin 0 -> 0 + 5/10 * 0.1
    assert _median([10] + [0] * 9) == pytest.approx(0.05)
    # [2, 6]: the running sum adds bin INDICES (0 after bin 0), so bin 1 is read from 0:
    # 0.1 + (4 - 0)/6 * 0.1 = 0.1667 (the exact median would be 0.1 + 2/6 * 0.1 = 0.1333)
    assert _median([2, 6] + [0] * 8) == pytest.approx(0.1 + 4 / 6 * 0.1, rel=1e-6)
    # [1, 1, 1, 1] over 4 bins: running sums 0, 0, 1 -> breaks at bin 2: 0.5 + 1/1 * 0.25
    assert _median([1, 1, 1, 1]) == pytest.approx(0.75)
    # [0, 0, 0, 2]: at bin 2 half == running sum == 1 over an empty bin: 0/0 = nan
    assert math.isnan(_median([0, 0, 0, 2]))
    # 100 bins: int(29 / 100 * 100) == 28, so the break at lb = 29 reads bin 28's count.
    # counts: 100 in bin 28, 900 in bin 99; half = 500; running sum at lb 28 is 378
    # (500 > 378 + 100, no break), at lb 29 it is 406: 500 <= 406 + counts[28] -> break:
    # 0.29 + (500 - 406) / 100 * 0.01
    counts = [0] * 100
    counts[28], counts[99] = 100, 900
    assert _median(counts) == pytest.approx(0.29 + 94 / 100 * 0.01, rel=1e-6)


def test_thresholds_floor_and_empty_classes():
    hist = css.EntropyHistogram(num_seen_classes=4, bins=4)
    hist.counts[0] = torch.tensor([1, 1, 1, 1])  # 0.75
    hist.counts[1] = torch.tensor([0, 0, 0, 2])  # nan: stays nan (Python's max keeps it)
    hist.counts[2] = torch.tensor([4, 0, 0, 0])  # 0 + 2/4 * 0.25 = 0.125
    th = hist.thresholds(floor=0.001)
    assert th[0].item() == pytest.approx(0.75)
    assert math.isnan(th[1].item())
    assert th[2].item() == pytest.approx(0.125)
    assert th[3].item() == pytest.approx(0.001)  # never predicted -> floor
    assert hist.thresholds(floor=0.3)[2].item() == pytest.approx(0.3)
    # the exact-median variant on the same counts
    exact = css.EntropyHistogram(4, bins=4, mode="median")
    exact.counts.copy_(hist.counts)
    assert exact.thresholds(0.001).tolist() == pytest.approx([0.5, 0.875, 0.125, 0.001])


def test_entropy_histogram_update_bins_plops_value_of_background_pixels():
    # (1, 2, 1, 3): px0 uniform over 2 classes, px1 confident class 1, px2 labelled new
    old_logits = torch.tensor([[[[0.0, 0.0, 0.0]], [[0.0, 30.0, 0.0]]]])
    labels = torch.tensor([[[0, 0, 2]]])
    hist = css.EntropyHistogram(3, bins=100)
    hist.update(old_logits, labels)
    assert hist.counts.sum().item() == 2
    # px0: entropy() of [0.5, 0.5] = 0.5, / log(3 seen classes) = 0.455 -> bin 45, class 0
    assert hist.counts[0, int(0.5 / math.log(3) * 100)].item() == 1
    assert hist.counts[1, 0].item() == 1
    th = css.plop_thresholds(old_logits, labels, 3)
    assert th.shape == (3,)
    # class 0 (one count in bin 45, half = 0.5): the running sum of bin indices passes 0.5
    # at bin 2 before bin 45 is reached, so no bin breaks the loop and the last bin's empty
    # count gives (0.5 - 4950) / 0 = -inf: the floor. (The exact median would be 0.455.)
    assert th[0].item() == pytest.approx(0.001)
    # class 1 (one count in bin 0): 0 + 0.5 / 1 * 0.01
    assert th[1].item() == pytest.approx(0.005)
    assert th[2].item() == pytest.approx(0.001)


def test_pseudo_label_by_hand():
    # 1 image, 2 old classes, 3 seen; pixels: bg, bg, new class 2, ignore, old class 1
    old_logits = torch.tensor([[[[30.0, 0.0, 0.0, 0.0, 30.0]], [[0.0, 0.0, 0.0, 0.0, 0.0]]]])
    labels = torch.tensor([[[0, 0, 2, 255, 1]]])
    thresholds = torch.tensor([0.1, 0.1, 0.1])
    out, factor = css.pseudo_label(labels, old_logits, thresholds, 3)
    # px0 confident -> 0; px1 uniform (0.455 > 0.1) -> ignored; px2, px3 untouched; px4 is
    # below num_old (background for PLOP) and confident -> its pseudo-label 0
    assert out.tolist() == [[[0, 255, 2, 255, 0]]]
    assert factor.tolist() == pytest.approx([2 / (3 + 1e-6)], rel=1e-6)
    # a threshold above the uncertainty makes px1 confident too
    out2, factor2 = css.pseudo_label(labels, old_logits, torch.tensor([0.5, 0.5, 0.5]), 3)
    assert out2.tolist() == [[[0, 0, 2, 255, 0]]]
    assert factor2.item() == pytest.approx(1.0, rel=1e-5)
    logits = torch.randn(1, 3, 1, 5)
    loss = css.pseudo_label_cross_entropy(logits, out, factor)
    ce = F.cross_entropy(logits, out, ignore_index=255, reduction="none")
    assert loss.item() == pytest.approx((factor * ce).mean().item(), rel=1e-5)


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

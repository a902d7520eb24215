"""The per-method step losses built from the config."""

import math

import pytest
import torch
import torch.nn.functional as F

from icd_dist.config import ConfigError, load_config
from icd_dist.css import get_task
from icd_dist.losses import css
from icd_dist.losses.icd import external_loss, internal_loss
from icd_dist.losses.methods import build_step_loss
from icd_dist.models import SegOutput

TASK = get_task("voc", "15-5")  # step 1: 16 old classes, 5 new


def outputs(seed, num_classes, shapes=((2, 4, 8, 8), (2, 6, 4, 4), (2, 6, 4, 4))):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.relu(torch.randn(s, generator=g)) for s in shapes]
    logits = torch.randn(2, num_classes, 8, 8, generator=g)
    return SegOutput(logits, feats)


def labels_step1(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 21, (2, 8, 8), generator=g)
    labels[labels < 16] = 0
    labels[0, 0, :3] = 255
    return labels


def cfg_for(method, *extra):
    return load_config(None, ["data.dataset=voc", "task.name=15-5", f"method.name={method}",
                              *extra])


@pytest.mark.parametrize("method", ["ft", "mib", "plop", "icd"])
def test_step0_is_plain_ce_for_every_method(method):
    loss_fn = build_step_loss(cfg_for(method), TASK, 0)
    out = outputs(0, 16)
    labels = torch.randint(0, 16, (2, 8, 8))
    loss, parts = loss_fn(out, None, labels)
    assert not loss_fn.needs_teacher
    assert set(parts) == {"seg", "total"}
    assert loss.item() == pytest.approx(F.cross_entropy(out.logits, labels).item(), rel=1e-6)


def test_ft_step1_is_ce_without_teacher():
    loss_fn = build_step_loss(cfg_for("ft"), TASK, 1)
    out, labels = outputs(1, 21), labels_step1()
    loss, parts = loss_fn(out, None, labels)
    assert set(parts) == {"seg", "total"}
    assert loss.item() == pytest.approx(
        F.cross_entropy(out.logits, labels, ignore_index=255).item(), rel=1e-6)


def test_mib_step1_components():
    loss_fn = build_step_loss(cfg_for("mib", "loss.lambda_kd=7.0"), TASK, 1)
    student, teacher, labels = outputs(2, 21), outputs(3, 16), labels_step1()
    loss, parts = loss_fn(student, teacher, labels)
    assert parts["seg"].item() == pytest.approx(
        css.unbiased_cross_entropy(student.logits, labels, 16).item())
    assert parts["kd"].item() == pytest.approx(
        7.0 * css.unbiased_kd(student.logits, teacher.logits).item())
    assert loss.item() == pytest.approx(parts["seg"].item() + parts["kd"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs the teacher"):
        loss_fn(student, None, labels)


def test_icd_step1_components_with_adaptive_factor():
    # eager: this checks how the terms are combined; the fused paths are checked against the
    # reference in test_icd_kernels.py.
    loss_fn = build_step_loss(cfg_for("icd", "loss.icd.lambda_int=2.0", "loss.icd.impl=eager",
                                      "loss.icd.lambda_ext=30.0", "loss.icd.tau=0.5"), TASK, 1)
    student, teacher, labels = outputs(4, 21), outputs(5, 16), labels_step1()
    loss, parts = loss_fn(student, teacher, labels)
    s_t = math.sqrt(21 / 5)
    assert parts["int"].item() == pytest.approx(
        s_t * 2.0 * internal_loss(student.features, teacher.features).item(), rel=1e-6)
    assert parts["ext"].item() == pytest.approx(
        s_t * 30.0 * external_loss(student.features, teacher.features, 0.5).item(), rel=1e-6)
    assert loss.item() == pytest.approx(sum(parts[k].item() for k in
                                            ("seg", "kd", "int", "ext")), rel=1e-6)
    no_factor = build_step_loss(cfg_for("icd", "loss.icd.adaptive_factor=false",
                                        "loss.icd.impl=eager"), TASK, 1)
    _, parts_nf = no_factor(student, teacher, labels)
    assert parts_nf["int"].item() == pytest.approx(
        internal_loss(student.features, teacher.features).item(), rel=1e-6)


def test_icd_terms_can_be_switched_off():
    loss_fn = build_step_loss(cfg_for("icd", "loss.icd.lambda_int=0", "loss.lambda_kd=0"),
                              TASK, 1)
    _, parts = loss_fn(outputs(6, 21), outputs(7, 16), labels_step1())
    assert set(parts) == {"seg", "ext", "total"}


def test_plop_step1_pseudo_labels_and_pod():
    loss_fn = build_step_loss(cfg_for("plop"), TASK, 1)
    student, teacher, labels = outputs(8, 21), outputs(9, 16), labels_step1()
    assert loss_fn.needs_pseudo_thresholds
    with pytest.raises(RuntimeError, match="set_pseudo_thresholds"):
        loss_fn(student, teacher, labels)
    thresholds = torch.full((16,), 0.9)
    loss_fn.set_pseudo_thresholds(thresholds)
    loss, parts = loss_fn(student, teacher, labels)
    pseudo, weights = css.pseudo_label(labels, teacher.logits, thresholds)
    assert parts["seg"].item() == pytest.approx(
        css.pseudo_label_cross_entropy(student.logits, pseudo, weights).item(), rel=1e-6)
    levels = [css.local_pod_distance(s, t) for s, t in zip(student.features, teacher.features,
                                                           strict=True)]
    pod_logits = css.local_pod_logits(student.logits, teacher.logits)
    expected = math.sqrt(21 / 5) * 0.01 * (sum(levels) + 0.0005 * pod_logits) / 4
    assert parts["pod"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="16 thresholds"):
        loss_fn.set_pseudo_thresholds(torch.ones(3))


def test_joint_needs_the_offline_task_and_ft_needs_ce():
    with pytest.raises(ConfigError, match="task.name=offline"):
        build_step_loss(cfg_for("joint"), TASK, 0)
    joint = build_step_loss(cfg_for("joint"), get_task("voc", "offline"), 0)
    assert not joint.needs_teacher
    with pytest.raises(ConfigError, match="loss.seg"):
        build_step_loss(cfg_for("ft", "loss.seg=unbiased_ce"), TASK, 1)


def test_icd_with_pseudo_label_segmentation_option():
    loss_fn = build_step_loss(cfg_for("icd", "loss.seg=pseudo_ce"), TASK, 1)
    assert loss_fn.needs_pseudo_thresholds


def test_learned_msca_is_the_models_trained_at_step1_only_and_used_by_the_loss():
    from icd_dist.losses.icd import MSCA
    from icd_dist.losses.methods import attach_learned_msca, without_learned_msca

    cfg = cfg_for("icd", "loss.icd.msca=learned", "loss.icd.impl=eager")
    assert attach_learned_msca(cfg_for("icd"), torch.nn.Module(), 1) is None  # fixed: none
    assert attach_learned_msca(cfg_for("mib", "loss.icd.msca=learned"), torch.nn.Module(),
                               1) is None
    trainable = {}
    for step in (0, 1, 2):
        model = torch.nn.Module()
        msca = attach_learned_msca(cfg, model, step)
        assert model.msca is msca and len(list(msca.parameters())) == 7
        trainable[step] = all(p.requires_grad for p in msca.parameters())
        state = {"head.w": torch.zeros(1), **{f"msca.{k}": v for k, v in msca.state_dict().items()}}
        assert list(without_learned_msca(state)) == ["head.w"]
    assert trainable == {0: False, 1: True, 2: False}

    loss_fn = build_step_loss(cfg, TASK, 1)
    assert list(loss_fn.parameters()) == []  # the kernels live in the model, not the loss
    student, teacher, labels = outputs(1, 21), outputs(2, 16), labels_step1()
    with pytest.raises(ValueError, match="learned"):
        loss_fn(student, teacher, labels)
    model = torch.nn.Module()
    msca = attach_learned_msca(cfg, model, 1)
    with torch.no_grad():  # kernels away from the averaging ones change the external term
        msca.w5.mul_(3.0).add_(torch.linspace(0, 0.2, 25).view(1, 1, 5, 5))
    _, parts = loss_fn(student, teacher, labels, msca=msca)
    factor = math.sqrt(21 / 5)
    icd = cfg.loss.icd
    expected = external_loss(student.features, teacher.features, icd.tau, msca)
    assert parts["ext"].item() == pytest.approx(factor * icd.lambda_ext * expected.item(),
                                                rel=1e-5)
    fixed = external_loss(student.features, teacher.features, icd.tau, MSCA())
    assert abs(expected.item() - fixed.item()) > 1e-6 * max(1.0, fixed.item())
    loss, _ = loss_fn(student, teacher, labels, msca=msca)
    loss.backward()
    assert msca.w5.grad is not None and msca.w5.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="learned"):  # not with a fixed MSCA
        build_step_loss(cfg_for("icd"), TASK, 1)(student, teacher, labels, msca=msca)

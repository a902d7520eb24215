"""The method registry: each method's step loss, classifier init and per-step state."""

import math

import pytest
import torch
import torch.nn.functional as F

from icd_dist.config import ConfigError, load_config
from icd_dist.css import get_task
from icd_dist.losses import css
from icd_dist.losses.icd import MSCA, external_loss, internal_loss
from icd_dist.methods import METHODS, build_method, inference_state
from icd_dist.models import SegOutput
from icd_dist.models.deeplab import DeepLabV3

TASK = get_task("voc", "15-5")  # step 1: 16 old classes, 5 new


def outputs(seed, num_classes, shapes=((2, 4, 8, 8), (2, 6, 4, 4), (2, 6, 4, 4))):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.relu(torch.randn(s, generator=g)) for s in shapes]
    head_logits = torch.randn(2, num_classes, 4, 4, generator=g)
    logits = F.interpolate(head_logits, size=(8, 8), mode="bilinear", align_corners=False)
    return SegOutput(logits, feats, head_logits)


def labels_step1(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 21, (2, 8, 8), generator=g)
    labels[labels < 16] = 0
    labels[0, 0, :3] = 255
    return labels


def cfg_for(method, *extra):
    return load_config(None, ["data.dataset=voc", "task.name=15-5", f"method.name={method}",
                              *extra])


def test_registry_has_every_method_of_the_config():
    assert set(METHODS) == {"ft", "joint", "mib", "plop", "icd", "dkd"}


@pytest.mark.parametrize("method", ["ft", "mib", "plop", "icd"])
def test_step0_is_plain_ce_averaged_over_all_pixels(method):
    loss_fn = build_method(cfg_for(method), TASK, 0)
    out = outputs(0, 16)
    labels = torch.randint(0, 16, (2, 8, 8))
    labels[1, :2] = 255  # 16 of 128 pixels ignored
    loss, parts = loss_fn(out, None, labels)
    assert not loss_fn.needs_teacher
    assert set(parts) == {"seg", "total"}
    per_pixel = F.cross_entropy(out.logits, labels, ignore_index=255, reduction="none")
    # MiB/PLOP's train.py: reduction='none' then .mean(): ignored pixels count 0 in the mean
    assert loss.item() == pytest.approx((per_pixel.sum() / 128).item(), rel=1e-6)
    assert loss.item() == pytest.approx(
        F.cross_entropy(out.logits, labels, ignore_index=255).item() * 112 / 128, rel=1e-6)


def test_ft_step1_is_ce_without_teacher():
    loss_fn = build_method(cfg_for("ft"), TASK, 1)
    out, labels = outputs(1, 21), labels_step1()
    loss, parts = loss_fn(out, None, labels)
    assert set(parts) == {"seg", "total"}
    per_pixel = F.cross_entropy(out.logits, labels, ignore_index=255, reduction="none")
    assert loss.item() == pytest.approx(per_pixel.mean().item(), rel=1e-6)


def _initialised_student(cfg):
    torch.manual_seed(0)
    old = DeepLabV3("resnet18", [16], head_channels=8)
    with torch.no_grad():
        old.classifier.heads[0].bias.normal_()
    student = DeepLabV3("resnet18", [16], head_channels=8)
    build_method(cfg, TASK, 1).init_student(student, old.state_dict())
    return old, student


def test_ft_new_head_is_random_and_mib_init_for_the_others():
    old, ft = _initialised_student(cfg_for("ft"))
    bg_w, bg_b = old.classifier.heads[0].weight[0], old.classifier.heads[0].bias[0]
    new = ft.classifier.heads[1]
    assert new.weight.shape == (5, 8, 1, 1)
    assert not torch.equal(new.weight[0], bg_w)  # standard fine-tuning: the layer's init
    assert ft.classifier.heads[0].bias[0].item() == bg_b.item()  # old head untouched
    bound = 1 / math.sqrt(8)  # Conv2d's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert new.weight.abs().max() <= bound and new.weight.std() > 0.1 * bound
    for name in ("mib", "plop", "icd"):
        _, student = _initialised_student(cfg_for(name))
        head = student.classifier.heads[1]
        assert torch.equal(head.weight, bg_w.expand_as(head.weight))
        expected = bg_b.item() - math.log(6)
        assert torch.allclose(head.bias, torch.full((5,), expected))
        assert student.classifier.heads[0].bias[0].item() == pytest.approx(expected)
    # the config overrides the method's choice both ways
    _, ft_mib = _initialised_student(cfg_for("ft", "model.mib_init=true"))
    assert torch.equal(ft_mib.classifier.heads[1].weight[0], bg_w)
    _, mib_random = _initialised_student(cfg_for("mib", "model.mib_init=false"))
    assert not torch.equal(mib_random.classifier.heads[1].weight[0], bg_w)


def test_mib_step1_components():
    loss_fn = build_method(cfg_for("mib", "loss.lambda_kd=7.0"), TASK, 1)
    student, teacher, labels = outputs(2, 21), outputs(3, 16), labels_step1()
    loss, parts = loss_fn(student, teacher, labels)
    per_pixel = css.unbiased_cross_entropy(student.logits, labels, 16, reduction="none")
    assert parts["seg"].item() == pytest.approx(per_pixel.sum().item() / 128, rel=1e-6)
    assert parts["kd"].item() == pytest.approx(
        7.0 * css.unbiased_kd(student.logits, teacher.logits).item())
    assert loss.item() == pytest.approx(parts["seg"].item() + parts["kd"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs the teacher"):
        loss_fn(student, None, labels)


def test_icd_step1_components_with_adaptive_factor():
    # eager: this checks how the terms are combined; the fused paths are checked against the
    # reference in test_icd_kernels.py.
    loss_fn = build_method(cfg_for("icd", "loss.icd.lambda_int=2.0", "loss.icd.impl=eager",
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
    no_factor = build_method(cfg_for("icd", "loss.icd.adaptive_factor=false",
                                     "loss.icd.impl=eager"), TASK, 1)
    _, parts_nf = no_factor(student, teacher, labels)
    assert parts_nf["int"].item() == pytest.approx(
        internal_loss(student.features, teacher.features).item(), rel=1e-6)


def test_icd_terms_can_be_switched_off():
    loss_fn = build_method(cfg_for("icd", "loss.icd.lambda_int=0", "loss.lambda_kd=0"),
                           TASK, 1)
    _, parts = loss_fn(outputs(6, 21), outputs(7, 16), labels_step1())
    assert set(parts) == {"seg", "ext", "total"}


class _FixedTeacher(torch.nn.Module):
    """A 'teacher' that returns given outputs and records the dtype of its input."""

    def __init__(self, out, dtype=torch.float32):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.out = out
        self.seen_dtypes = []

    def forward(self, x):
        self.seen_dtypes.append(x.dtype)
        return self.out


def test_plop_step1_thresholds_pseudo_labels_and_pod():
    loss_fn = build_method(cfg_for("plop"), TASK, 1)
    student, teacher, labels = outputs(8, 21), outputs(9, 16), labels_step1()
    assert loss_fn.needs_teacher
    with pytest.raises(RuntimeError, match="prepare"):
        loss_fn(student, teacher, labels)
    # prepare(): one pass of the (bf16) teacher over the data gives PLOP's thresholds
    bf16_teacher = _FixedTeacher(teacher, torch.bfloat16)
    loss_fn.prepare(bf16_teacher, lambda: [(torch.zeros(2, 3, 8, 8), labels)])
    assert bf16_teacher.seen_dtypes == [torch.bfloat16]  # input cast to the teacher's dtype
    expected_thresholds = css.plop_thresholds(teacher.logits, labels, 21)
    assert torch.equal(loss_fn.thresholds, expected_thresholds)
    loss, parts = loss_fn(student, teacher, labels)
    pseudo, weights = css.pseudo_label(labels, teacher.logits, expected_thresholds, 21)
    assert parts["seg"].item() == pytest.approx(
        css.pseudo_label_cross_entropy(student.logits, pseudo, weights).item(), rel=1e-6)
    # POD: features at 0.01, the head-resolution logits (new classes summed into the
    # background) at 0.0005 instead, averaged over the 4 levels, times sqrt(21 / 5)
    levels = [css.local_pod_distance(s, t) for s, t in zip(student.features, teacher.features,
                                                           strict=True)]
    merged = css.sum_new_into_background(student.head_logits, 16)
    pod_logits = css.local_pod_distance(merged, teacher.head_logits)
    expected = math.sqrt(21 / 5) * (0.01 * sum(levels) + 0.0005 * pod_logits) / 4
    assert parts["pod"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="21 thresholds"):
        loss_fn.set_thresholds(torch.ones(3))


def test_plop_median_threshold_variant_is_a_named_option():
    loss_fn = build_method(cfg_for("plop", "loss.pod.thresholds=median"), TASK, 1)
    teacher, labels = outputs(9, 16), labels_step1()
    loss_fn.prepare(_FixedTeacher(teacher), lambda: [(torch.zeros(2, 3, 8, 8), labels)])
    hist = css.EntropyHistogram(21, 100, "median")
    hist.update(teacher.logits, labels)
    assert torch.equal(loss_fn.thresholds, hist.thresholds(0.001))
    assert not torch.equal(loss_fn.thresholds, css.plop_thresholds(teacher.logits, labels, 21))


def test_joint_needs_the_offline_task_and_ft_needs_ce():
    with pytest.raises(ConfigError, match="task.name=offline"):
        build_method(cfg_for("joint"), TASK, 0)
    joint = build_method(cfg_for("joint"), get_task("voc", "offline"), 0)
    assert not joint.needs_teacher
    with pytest.raises(ConfigError, match="loss.seg"):
        build_method(cfg_for("ft", "loss.seg=unbiased_ce"), TASK, 1)


def test_icd_with_pseudo_label_segmentation_option():
    loss_fn = build_method(cfg_for("icd", "loss.seg=pseudo_ce"), TASK, 1)
    student, teacher, labels = outputs(8, 21), outputs(9, 16), labels_step1()
    with pytest.raises(RuntimeError, match="prepare"):
        loss_fn(student, teacher, labels)
    loss_fn.prepare(_FixedTeacher(teacher), lambda: [(torch.zeros(2, 3, 8, 8), labels)])
    _, parts = loss_fn(student, teacher, labels)
    assert {"seg", "kd", "int", "ext"} <= set(parts)


TASK3 = get_task("voc", "15-1")  # steps of 16, 1, 1, ... classes


def _msca_student(cfg, step, previous_state):
    model = DeepLabV3("resnet18", [len(s) for s in TASK3.steps[:step]], head_channels=8)
    method = build_method(cfg, TASK3, step)
    method.init_student(model, previous_state)
    return method, model


def test_learned_msca_is_the_models_trained_at_step1_only_and_used_by_the_loss():
    cfg = cfg_for("icd", "loss.icd.msca=learned", "loss.icd.impl=eager")
    step0 = DeepLabV3("resnet18", [16], head_channels=8).state_dict()
    method1, model1 = _msca_student(cfg, 1, step0)
    assert len(list(model1.msca.parameters())) == 7
    assert all(p.requires_grad for p in model1.msca.parameters())
    assert list(method1.parameters()) == []  # the kernels live in the model, not the loss
    with torch.no_grad():  # kernels away from the averaging ones change the external term
        model1.msca.w5.mul_(3.0).add_(torch.linspace(0, 0.2, 25).view(1, 1, 5, 5))
    # step 2 carries the step-1 kernels (frozen), and inference drops them
    step1_state = model1.state_dict()
    assert any(k.startswith("msca.") for k in step1_state)
    assert not any(k.startswith("msca.") for k in inference_state(step1_state))
    _, model2 = _msca_student(cfg, 2, step1_state)
    assert torch.equal(model2.msca.w5, model1.msca.w5)
    assert not any(p.requires_grad for p in model2.msca.parameters())

    student, teacher, labels = outputs(1, 17), outputs(2, 16), labels_step1().clamp(max=16)
    _, parts = method1(student, teacher, labels)
    factor, icd = math.sqrt(17 / 1), cfg.loss.icd
    expected = external_loss(student.features, teacher.features, icd.tau, model1.msca)
    assert parts["ext"].item() == pytest.approx(factor * icd.lambda_ext * expected.item(),
                                                rel=1e-5)
    fixed = external_loss(student.features, teacher.features, icd.tau, MSCA())
    assert abs(expected.item() - fixed.item()) > 1e-6 * max(1.0, fixed.item())
    loss, _ = method1(student, teacher, labels)
    loss.backward()
    assert model1.msca.w5.grad is not None and model1.msca.w5.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="init_student"):
        build_method(cfg, TASK3, 1)(student, teacher, labels)
    # a fixed-MSCA ICD or another method adds nothing to the model
    for other in (cfg_for("icd"), cfg_for("mib", "loss.icd.msca=learned")):
        _, plain = _msca_student(other, 1, step0)
        assert not hasattr(plain, "msca")


def test_registry_flags_agree_with_what_each_method_does():
    """The benchmark plans from these flags (tools/css_benchmark.py): a method that trains its
    own step 0 has a step-0 identity of its own; the offline one has nothing to search."""
    for name, method in METHODS.items():
        cfg = load_config(f"configs/camvid/{'joint' if name == 'joint' else '6-5_' + name}.yaml")
        assert method.name == name
        assert method.trains_own_step0 == bool(method.step0_identity(cfg)), name
        assert method.offline == (method.search_space(cfg) == ()), name

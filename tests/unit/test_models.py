"""DeepLabV3 with taps, the incremental classifier, the teacher, and pretrained loading."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.segmentation import deeplabv3_resnet101

from icd_dist.config import load_config, replace
from icd_dist.css import get_task
from icd_dist.losses.methods import build_method
from icd_dist.models import (
    DeepLabV3,
    PretrainedFormatError,
    build_model,
    load_pretrained_backbone,
    make_teacher,
    to_sync_batchnorm,
)
from icd_dist.models.backbones import build_backbone


def test_r101_taps_at_512_and_parameter_count(capsys):
    model = DeepLabV3("resnet101", [21]).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 512, 512))
    assert [tuple(f.shape[1:]) for f in out.features] == [
        (256, 128, 128), (512, 64, 64), (1024, 32, 32), (2048, 32, 32), (256, 32, 32)]
    assert out.logits.shape == (1, 21, 512, 512)
    ours = sum(p.numel() for p in model.parameters())
    # torchvision's DeepLabV3-R101 (no auxiliary head) is the same network: same count
    reference = deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=21,
                                    aux_loss=False)
    assert ours == sum(p.numel() for p in reference.parameters())
    with capsys.disabled():
        print(f"\nDeepLabV3-R101 (21 classes) parameters: {ours:,}")


@pytest.mark.parametrize(("backbone", "os_", "channels", "sizes"), [
    ("resnet50", 8, (256, 512, 1024, 2048), (16, 8, 8, 8)),
    ("resnet18", 16, (64, 128, 256, 512), (16, 8, 4, 4)),
    ("resnet18", 8, (64, 128, 256, 512), (16, 8, 8, 8)),
    ("mobilenet_v3_large", 16, (24, 40, 112, 960), (16, 8, 4, 4)),
])
def test_backbones_output_stride(backbone, os_, channels, sizes):
    model = DeepLabV3(backbone, [3, 2], output_stride=os_, head_channels=32).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in out.features[:4]] == list(channels)
    assert [f.shape[-1] for f in out.features[:4]] == list(sizes)
    assert out.features[4].shape == (1, 32, sizes[-1], sizes[-1])
    assert out.logits.shape == (1, 5, 64, 64)


def test_groupnorm_option_has_no_batchnorm():
    model = DeepLabV3("resnet18", [3], head_channels=32, norm="groupnorm")
    kinds = {type(m) for m in model.modules()}
    assert nn.GroupNorm in kinds and nn.BatchNorm2d not in kinds
    model(torch.randn(1, 3, 32, 32))  # GroupNorm works with batch 1 in training mode


def test_mib_init_background_probability_is_preserved():
    torch.manual_seed(0)
    model = DeepLabV3("resnet18", [4], head_channels=16).eval()
    # give the classifier non-trivial weights and biases
    with torch.no_grad():
        model.classifier.heads[0].weight.normal_()
        model.classifier.heads[0].bias.normal_()
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        old = torch.softmax(model(x).logits, dim=1)
        model.add_step(3)
        new = torch.softmax(model(x).logits, dim=1)
    assert model.num_classes == 7
    assert torch.allclose(new[:, 0] + new[:, 4:].sum(dim=1), old[:, 0], atol=1e-6)
    assert torch.allclose(new[:, 1:4], old[:, 1:4], atol=1e-6)


def test_add_step_without_mib_init_leaves_old_head():
    model = DeepLabV3("resnet18", [2], head_channels=8)
    before = model.classifier.heads[0].bias.clone()
    model.add_step(1, mib_init=False)
    assert torch.equal(model.classifier.heads[0].bias, before)
    assert model.classifier.classes_per_step == [2, 1]


def test_teacher_is_frozen_copy():
    model = DeepLabV3("resnet18", [3], head_channels=8)
    teacher = make_teacher(model, torch.bfloat16)
    assert not teacher.training
    teacher.train()
    assert not teacher.training  # stays in eval mode
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    assert all(p.requires_grad for p in model.parameters()) and model.training
    with torch.no_grad():
        model.classifier.heads[0].bias.add_(1.0)
    assert not torch.equal(model.classifier.heads[0].bias.bfloat16(),
                           teacher.classifier.heads[0].bias)


def test_load_torchvision_weights(tmp_path):
    reference = resnet18()
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}},
               path)
    backbone = build_backbone("resnet18")
    assert load_pretrained_backbone(backbone, path) == "torchvision"
    assert torch.equal(backbone.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(backbone.bn1.running_var, reference.bn1.running_var)


def to_inplace_abn(state):
    """Rename a torchvision ResNet state dict to the in-place ABN checkpoint layout."""
    out = {}
    for k, v in state.items():
        if k.startswith("fc."):
            out[f"module.classifier.{k}"] = v
            continue
        if k.startswith(("conv1", "bn1")):
            out[f"module.mod1.{k}"] = v
            continue
        layer, block, rest = k.split(".", 2)
        rest = rest.replace("downsample.0", "proj_conv").replace("downsample.1", "proj_bn")
        if not rest.startswith("proj"):
            rest = f"convs.{rest}"
        out[f"module.mod{int(layer[-1]) + 1}.block{int(block) + 1}.{rest}"] = v
    return {"state_dict": out}


def test_load_inplace_abn_weights(tmp_path):
    reference = resnet50()
    with torch.no_grad():
        reference.layer2[0].bn1.weight.neg_()  # in-place ABN uses |weight|
    path = tmp_path / "r50_iabn.pth.tar"
    torch.save(to_inplace_abn(reference.state_dict()), path)
    backbone = build_backbone("resnet50")
    assert load_pretrained_backbone(backbone, path) == "inplace_abn"
    assert torch.equal(backbone.layer4[0].downsample[0].weight,
                       reference.layer4[0].downsample[0].weight)
    assert torch.allclose(backbone.layer2[0].bn1.weight,
                          reference.layer2[0].bn1.weight.abs() + 1e-5)
    assert torch.equal(backbone.layer1[2].conv3.weight, reference.layer1[2].conv3.weight)


def test_pretrained_errors(tmp_path):
    path = tmp_path / "weird.pth"
    torch.save({"encoder.w": torch.zeros(1)}, path)
    with pytest.raises(PretrainedFormatError, match="unknown weights format"):
        load_pretrained_backbone(build_backbone("resnet18"), path)
    path = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(PretrainedFormatError, match="does not fit backbone resnet50"):
        load_pretrained_backbone(build_backbone("resnet50"), path, "resnet50")
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        load_pretrained_backbone(build_backbone("resnet18"), tmp_path / "none.pth")


def test_build_model_from_config_loads_pretrained(tmp_path):
    path = tmp_path / "r18.pth"
    reference = resnet18()
    torch.save(reference.state_dict(), path)
    cfg = load_config(None, ["model.backbone=resnet18", f"model.pretrained={path}",
                             "model.head_channels=16"])
    model = build_model(cfg.model, [16])
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    fresh = build_model(cfg.model, [16], load_pretrained=False)
    assert not torch.equal(fresh.backbone.conv1.weight, reference.conv1.weight)


def test_resnet18_forward_backward_with_icd_loss_on_cpu():
    torch.manual_seed(0)
    cfg = load_config(None, ["model.backbone=resnet18", "method.name=icd",
                             "data.dataset=voc", "task.name=15-5", "loss.icd.impl=eager"])
    task = get_task("voc", "15-5")
    student = build_model(cfg.model, [16])
    teacher = make_teacher(student)
    student.add_step(5)
    loss_fn = build_method(cfg, task, 1)
    x = torch.randn(2, 3, 256, 256)
    labels = torch.randint(0, 21, (2, 256, 256))
    labels[labels < 16] = 0
    with torch.no_grad():
        t_out = teacher(x)
    loss, parts = loss_fn(student(x), t_out, labels)
    loss.backward()
    assert set(parts) == {"seg", "kd", "int", "ext", "total"}
    assert torch.isfinite(loss)
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert student.backbone.layer1[0].conv1.weight.grad.abs().sum() > 0


def test_training_step_with_fused_default_equals_eager():
    """The default loss.icd.impl (auto: compiled on CPU, Triton on CUDA) trains like the eager
    reference: same loss, same gradients, same weights after an optimiser step."""
    cfg = load_config(None, ["model.backbone=resnet18", "model.head_channels=32",
                             "model.norm=groupnorm", "method.name=icd", "data.dataset=voc",
                             "task.name=15-5", "loss.icd.lambda_ext=100"])
    assert cfg.loss.icd.impl == "auto"
    task = get_task("voc", "15-5")
    torch.manual_seed(0)
    initial = build_model(cfg.model, [16], load_pretrained=False)
    teacher = make_teacher(initial)
    initial.add_step(5)
    with torch.no_grad():  # a student that has drifted from its teacher, as during a step
        for p in initial.parameters():
            p.add_(0.2 * p.std().nan_to_num() * torch.randn_like(p))
    x = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 21, (2, 64, 64))
    labels[labels < 16] = 0
    with torch.no_grad():
        t_out = teacher(x)
    results = {}
    for impl in ("auto", "eager"):
        student = copy.deepcopy(initial)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
        loss_fn = build_method(replace(cfg, [f"loss.icd.impl={impl}"]), task, 1)
        torch.manual_seed(1)  # the same dropout masks in both runs
        loss, parts = loss_fn(student(x), t_out, labels)
        loss.backward()
        optimizer.step()
        results[impl] = (parts, [p.detach().clone() for p in student.parameters()])
    (fused_parts, fused_weights), (eager_parts, eager_weights) = results["auto"], results["eager"]
    for name in ("total", "int", "ext"):
        assert fused_parts[name].item() == pytest.approx(eager_parts[name].item(), rel=2e-3)
    assert fused_parts["int"] > 0 and fused_parts["ext"] > 0
    moved = [(a - b).abs().max().item() for a, b in zip(eager_weights,
             [p.detach() for p in initial.parameters()], strict=True)]
    assert max(moved) > 1e-3  # the step changed the weights, so the comparison below has teeth
    for a, b in zip(fused_weights, eager_weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sync_batchnorm_conversion_keeps_weights():
    model = DeepLabV3("resnet18", [3], head_channels=8)
    synced = to_sync_batchnorm(model)
    kinds = {type(m) for m in synced.modules()}
    assert nn.SyncBatchNorm in kinds and nn.BatchNorm2d not in kinds
    gn = to_sync_batchnorm(DeepLabV3("resnet18", [3], head_channels=8, norm="groupnorm"))
    assert nn.SyncBatchNorm not in {type(m) for m in gn.modules()}


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "mobilenet_v3_large"])
def test_pre_activation_taps_are_plops_and_leave_the_network_unchanged(backbone):
    torch.manual_seed(0)
    post = DeepLabV3(backbone, [3], head_channels=16).eval()
    pre = DeepLabV3(backbone, [3], head_channels=16, taps="pre_activation").eval()
    pre.load_state_dict(post.state_dict())  # same weights: only the taps differ
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = post(x), pre(x)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    torch.testing.assert_close(b.features[4], a.features[4], rtol=0, atol=0)  # the head tap
    if backbone == "mobilenet_v3_large":
        # stage ends are linear already; the last 1x1 conv is tapped before its hardswish
        for i in range(3):
            torch.testing.assert_close(b.features[i], a.features[i], rtol=0, atol=0)
        changed = [3]
        torch.testing.assert_close(F.hardswish(b.features[3]), a.features[3])
    else:
        changed = [0, 1, 2, 3]
        for i in changed:  # the residual sum before the ReLU
            torch.testing.assert_close(torch.relu(b.features[i]), a.features[i], rtol=0, atol=0)
    for i in changed:
        assert (b.features[i] < 0).any()  # PLOP's taps keep the negative part
    # gradients reach the backbone through a pre-activation tap
    pre.train()
    out = pre(x)
    out.features[0].pow(2).mean().backward()
    assert next(pre.backbone.parameters()).grad.abs().sum() > 0


def test_unknown_taps_are_refused():
    with pytest.raises(ValueError, match="pre_activation"):
        DeepLabV3("resnet18", [3], head_channels=8, taps="middle")

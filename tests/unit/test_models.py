"""DeepLabV3 with taps, the incremental classifier, the teacher, and pretrained loading."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.segmentation import deeplabv3_resnet101

from icd_dist.config import load_config, update
from icd_dist.css import get_task
from icd_dist.methods import build_method
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
    model = DeepLabV3("resnet101", [21], head="deeplabv3").eval()
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
        loss_fn = build_method(update(cfg, {"loss.icd.impl": impl}), task, 1)
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


# --------------------------------------------------------------------------------------
# The heads: MiB's (ft, joint, mib, plop, icd) and DKD's ASPP
# --------------------------------------------------------------------------------------


def test_mib_head_is_mibs_layers_and_parameter_count():
    model = DeepLabV3("resnet101", [21])  # model.head auto with the standard classifier
    assert model.head_kind == "mib"
    shapes = {k: tuple(v.shape) for k, v in model.head.state_dict().items()}
    # MiB modules/deeplab.py at hidden = out = 256, in = 2048, output stride 16
    assert shapes["map_convs.0.weight"] == (256, 2048, 1, 1)
    assert [model.head.map_convs[i].dilation for i in (1, 2, 3)] == [(6, 6), (12, 12), (18, 18)]
    assert shapes["map_bn.0.weight"] == (1024,)
    assert shapes["global_pooling_conv.weight"] == (256, 2048, 1, 1)
    assert shapes["red_conv.weight"] == (256, 1024, 1, 1)
    assert shapes["pool_red_conv.weight"] == (256, 256, 1, 1)
    assert shapes["red_bn.0.weight"] == (256,)
    # 2048*256*(1 + 3*9) + 2048*256 + 1024*256 + 256*256 convolutions, 2*(1024 + 256 + 256)
    # norm weights: 15,535,104
    assert sum(p.numel() for p in model.head.parameters()) == 15_535_104
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert sum(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.01
               for m in model.head.modules()) == 3


def test_aspp_rates_at_output_stride_8_are_each_authors():
    mib = DeepLabV3("resnet18", [3], output_stride=8, head_channels=8, head="mib")
    dkd = DeepLabV3("resnet18", [3], output_stride=8, head_channels=8, classifier="dkd")
    assert [mib.head.map_convs[i].dilation[0] for i in (1, 2, 3)] == [12, 24, 32]
    assert [dkd.head.branches[i][0].dilation[0] for i in (1, 2, 3)] == [12, 24, 36]


def _mib_head_reference(head, x):
    """MiB's head forward (eval mode) in float64 from its own layer list: the four map convs
    concatenated, BN + leaky ReLU, red_conv; global mean, conv, BN + leaky ReLU,
    pool_red_conv, repeated over (h, w) and added; BN + leaky ReLU."""
    p = {k: v.double() for k, v in head.state_dict().items()}
    x = x.double()

    def bn_leaky(t, name):
        t = F.batch_norm(t, p[f"{name}.0.running_mean"], p[f"{name}.0.running_var"],
                         p[f"{name}.0.weight"], p[f"{name}.0.bias"], False, 0.0, 1e-5)
        return torch.where(t >= 0, t, 0.01 * t)

    maps = [F.conv2d(x, p["map_convs.0.weight"])]
    for i, d in ((1, 6), (2, 12), (3, 18)):
        maps.append(F.conv2d(x, p[f"map_convs.{i}.weight"], padding=d, dilation=d))
    out = F.conv2d(bn_leaky(torch.cat(maps, 1), "map_bn"), p["red_conv.weight"])
    pool = x.reshape(x.shape[0], x.shape[1], -1).mean(-1)[..., None, None]
    pool = bn_leaky(F.conv2d(pool, p["global_pooling_conv.weight"]), "global_pooling_bn")
    pool = F.conv2d(pool, p["pool_red_conv.weight"]).repeat(1, 1, x.shape[2], x.shape[3])
    return bn_leaky(out + pool, "red_bn")


def test_mib_head_forward_equals_mibs_computation():
    torch.manual_seed(0)
    model = DeepLabV3("resnet18", [3], head_channels=16)
    head = model.head
    for m in head.modules():  # non-trivial statistics and affine weights
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    head.eval()
    x = torch.randn(2, 512, 5, 7)
    with torch.no_grad():
        ours = head(x)
    torch.testing.assert_close(ours.double(), _mib_head_reference(head, x),
                               rtol=1e-4, atol=1e-5)
    assert (ours < 0).any()  # the leaky ReLU lets negative values through


def test_head_inits_are_each_authors():
    torch.manual_seed(0)
    mib = DeepLabV3("resnet18", [3], head_channels=128).head
    gain = nn.init.calculate_gain("leaky_relu", 0.01)
    for name in ("red_conv", "pool_red_conv", "global_pooling_conv"):
        w = getattr(mib, name).weight  # xavier_normal_: gain * sqrt(2 / (fan_in + fan_out))
        fan_in, fan_out = w.shape[1] * w[0, 0].numel(), w.shape[0] * w[0, 0].numel()
        expected = gain * (2 / (fan_in + fan_out)) ** 0.5
        assert abs(w.std().item() / expected - 1) < 0.03, name
    for m in mib.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_unknown_head_is_refused():
    with pytest.raises(ValueError, match="head must be auto or one of mib, deeplabv3"):
        DeepLabV3("resnet18", [3], head="aspp")

"""DKD (cvlab-yonsei/DKD) in the harness: its five terms against hand-derived values and an
independent loop reference (values and gradients, float64), its prediction rule, its
classifier and the new classifiers' initialisation, its recipe (frozen norm layers and
dropout at t > 0, optimiser groups), its config section, its step-0 key and its configs."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from icd_dist.config import ConfigError, dump_config, load_config, update, value_at
from icd_dist.css import get_task
from icd_dist.css.classes import generic_spec
from icd_dist.losses.dkd import dkd_terms
from icd_dist.methods import METHODS, build_method
from icd_dist.models.deeplab import DeepLabV3
from icd_dist.models.dkd_classifier import DKDClassifier, dkd_predict
from icd_dist.models.teacher import freeze
from icd_dist.train.storage import Storage

LN2, LN3 = math.log(2.0), math.log(3.0)
TASK = get_task("voc", "15-5")  # step 1: 15 old classes (background not counted), 5 new
DKD_MODEL = ["method.name=dkd", "model.classifier=dkd"]


def cfg_for(*extra):
    return load_config(None, ["data.dataset=voc", "task.name=15-5", *DKD_MODEL, *extra])


def t64(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


# --------------------------------------------------------------------------------------
# The five terms
# --------------------------------------------------------------------------------------


def hand_case():
    """One image of 1 x 2 pixels, o = 1 old class, n = 1 new class (id 2); pixel 1 ignored.

    logits channels: 0 auxiliary, 1 old, 2 new. Worked out with l(x, t) = p t softplus(-x)
    + (1 - t) softplus(x), softplus(0) = ln 2, softplus(ln 3) = ln 4, softplus(-ln 3) = ln 4/3,
    s(ln 3) = 3/4."""
    logits = t64([[[[0.0, LN3]], [[LN3, 0.0]], [[0.0, 0.0]]]])
    logits_old = t64([[[[7.0, -7.0]], [[0.0, LN3]]]])  # its auxiliary channel is not used
    pos, pos_old = t64([[[[0.0]], [[5.0]]]]), t64([[[[LN3]]]])
    neg, neg_old = t64([[[[-LN3]], [[-5.0]]]]), t64([[[[0.0]]]])
    labels = torch.tensor([[[2, 255]]])
    return logits, logits_old, pos, pos_old, neg, neg_old, labels


def test_terms_equal_hand_derived_values():
    logits, logits_old, pos, pos_old, neg, neg_old, labels = hand_case()
    terms = dkd_terms(logits, logits_old, pos, pos_old, neg, neg_old, labels, 1, 1,
                      pos_weight=2.0)
    assert list(terms) == ["mbce", "kd", "dkd_pos", "dkd_neg", "ac"]
    # mbce: pixel 0 is the new class (2 ln 2 with pos_weight 2); the ignored pixel is a
    # negative that counts in the mean (ln 2), as DKD's WBCELoss builds its target
    assert terms["mbce"].item() == pytest.approx((2 * LN2 + LN2) / 2, abs=1e-12)
    # kd: l(ln 3, s(0) = 1/2) = ln 4 - ln 3 / 2 and l(0, s(ln 3)) = ln 2, averaged
    assert terms["kd"].item() == pytest.approx((2 * LN2 - LN3 / 2 + LN2) / 2, abs=1e-12)
    # dkd_pos: the old class only (the new channel's 5.0 is left out): l(0, 3/4) = ln 2
    assert terms["dkd_pos"].item() == pytest.approx(LN2, abs=1e-12)
    # dkd_neg: l(-ln 3, 1/2) = ln 4/3 + ln 3 / 2
    assert terms["dkd_neg"].item() == pytest.approx(2 * LN2 - LN3 / 2, abs=1e-12)
    # ac: the auxiliary channel against 0: (ln 2 + ln 4) / 2
    assert terms["ac"].item() == pytest.approx(1.5 * LN2, abs=1e-12)
    assert all(v.dtype == torch.float64 and v.dim() == 0 for v in terms.values())
    plain = dkd_terms(logits, logits_old, pos, pos_old, neg, neg_old, labels, 1, 1)
    assert plain["mbce"].item() == pytest.approx(LN2, abs=1e-12)  # pos_weight 1


def test_term_gradients_equal_hand_derived_values():
    # dl/dx = -p t (1 - s(x)) + (1 - t) s(x), divided by the N*H*W of the mean, times g
    g = 0.7
    logits, logits_old, pos, pos_old, neg, neg_old, labels = hand_case()
    terms = dkd_terms(logits, logits_old, pos, pos_old, neg, neg_old, labels, 1, 1, 2.0)
    inputs = (logits, logits_old, pos, pos_old, neg, neg_old)

    def grads(name):
        return torch.autograd.grad(terms[name], inputs, grad_outputs=torch.tensor(
            g, dtype=torch.float64), retain_graph=True, allow_unused=True)

    def expect(tensor, channel_values):
        out = torch.zeros_like(tensor)
        for c, values in channel_values.items():
            out[0, c] = torch.tensor(values, dtype=torch.float64).view_as(out[0, c])
        return g * out

    d = grads("mbce")
    torch.testing.assert_close(d[0], expect(logits, {2: [-2 * 0.5 / 2, 0.5 / 2]}))
    d = grads("kd")
    torch.testing.assert_close(d[0], expect(logits, {1: [(0.75 - 0.5) / 2, (0.5 - 0.75) / 2]}))
    d = grads("ac")
    torch.testing.assert_close(d[0], expect(logits, {0: [0.5 / 2, 0.75 / 2]}))
    d = grads("dkd_pos")
    torch.testing.assert_close(d[2], expect(pos, {0: [0.5 - 0.75]}))
    d = grads("dkd_neg")
    torch.testing.assert_close(d[4], expect(neg, {0: [0.25 - 0.5]}))
    # the teacher's outputs are targets only
    for name in ("kd", "dkd_pos", "dkd_neg"):
        d = grads(name)
        assert d[1] is None and d[3] is None and d[5] is None


def _bce(x, t, p=1.0):
    return p * t * math.log1p(math.exp(-x)) + (1 - t) * math.log1p(math.exp(x))


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _mean_bce(student, target_fn, channels, p=1.0):
    """sum over channels of the mean over (n, y, x) of l(student[n][c][y][x], target)."""
    total = 0.0
    for c_out, c in enumerate(channels):
        vals = [_bce(student[n][c][y][x], target_fn(n, c_out, y, x), p)
                for n in range(len(student)) for y in range(len(student[0][0]))
                for x in range(len(student[0][0][0]))]
        total += sum(vals) / len(vals)
    return total


def reference(logits, logits_old, pos, pos_old, neg, neg_old, labels, o, n, p):
    """DKD's terms by loops over plain floats (an independent reference)."""
    L, T, lab = logits.tolist(), logits_old.tolist(), labels.tolist()
    P, PT, G, GT = pos.tolist(), pos_old.tolist(), neg.tolist(), neg_old.tolist()
    return {
        "mbce": _mean_bce(L, lambda b, j, y, x: float(lab[b][y][x] == o + 1 + j),
                          range(o + 1, o + n + 1), p),
        "kd": _mean_bce(L, lambda b, i, y, x: _sig(T[b][i + 1][y][x]), range(1, o + 1)),
        "dkd_pos": _mean_bce(P, lambda b, i, y, x: _sig(PT[b][i][y][x]), range(o)),
        "dkd_neg": _mean_bce(G, lambda b, i, y, x: _sig(GT[b][i][y][x]), range(o)),
        "ac": _mean_bce(L, lambda b, i, y, x: 0.0, [0]),
    }


def random_case(seed, o=3, n=2, shape=(2, 5, 3), head=(3, 2)):
    g = torch.Generator().manual_seed(seed)
    N, H, W = shape

    def r(*s):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * 2).requires_grad_()

    labels = torch.randint(0, o + n + 1, shape, generator=g)  # old ids too: negatives
    labels[0, 0] = 255
    return (r(N, 1 + o + n, H, W), r(N, 1 + o, H, W), r(N, o + n, *head), r(N, o, *head),
            r(N, o + n, *head), r(N, o, *head), labels)


@pytest.mark.parametrize("seed,o,n,p", [(0, 3, 2, 1.0), (1, 3, 2, 2.0), (2, 1, 3, 35.0)])
def test_terms_equal_a_loop_reference_on_odd_shapes(seed, o, n, p):
    case = random_case(seed, o, n)
    terms = dkd_terms(*case, o, n, p)
    ref = reference(*case, o, n, p)
    for k in ref:
        assert terms[k].item() == pytest.approx(ref[k], rel=1e-12), k


def test_weighted_total_gradients_pass_gradcheck():
    logits, logits_old, pos, pos_old, neg, neg_old, labels = random_case(3)
    weights = {"mbce": 1.0, "kd": 5.0, "dkd_pos": 5.0, "dkd_neg": 5.0, "ac": 1.0}

    def total(lg, ps, ng):
        t = dkd_terms(lg, logits_old.detach(), ps, pos_old.detach(), ng, neg_old.detach(),
                      labels, 3, 2, pos_weight=2.0)
        return sum(w * t[k] for k, w in weights.items())

    assert torch.autograd.gradcheck(total, (logits, pos, neg))


def test_step0_has_mbce_over_every_class_and_ac_only():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 4, 5, 3, generator=g, dtype=torch.float64)  # aux + classes 1..3
    labels = torch.randint(0, 4, (2, 5, 3), generator=g)
    labels[1, 1] = 255
    terms = dkd_terms(logits, None, None, None, None, None, labels, 0, 3, pos_weight=2.0)
    L, lab = logits.tolist(), labels.tolist()
    assert terms["mbce"].item() == pytest.approx(
        _mean_bce(L, lambda b, j, y, x: float(lab[b][y][x] == j + 1), range(1, 4), 2.0),
        rel=1e-12)
    assert terms["ac"].item() == pytest.approx(_mean_bce(L, lambda *a: 0.0, [0]), rel=1e-12)
    assert terms["kd"].item() == terms["dkd_pos"].item() == terms["dkd_neg"].item() == 0.0


def test_terms_refuse_mismatched_channels():
    case = list(random_case(5))
    with pytest.raises(ValueError, match="expected 1 \\(auxiliary\\) \\+ 3 old \\+ 3 new"):
        dkd_terms(*case, 3, 3)
    with pytest.raises(ValueError, match="need the teacher"):
        dkd_terms(case[0], None, *case[2:], 3, 2)
    case[3] = case[3][:, :2]
    with pytest.raises(ValueError, match="pos_reg"):
        dkd_terms(*case, 3, 2)


def test_method_weights_terms_and_logs_them():
    cfg = cfg_for("loss.dkd.kd=3", "loss.dkd.ac=0.5", "loss.dkd.pos_weight=1.5")
    method = build_method(cfg, TASK, 1)
    logits, logits_old, pos, pos_old, neg, neg_old, labels = random_case(6, o=15, n=5)
    student = SimpleNamespace(logits=logits, pos_reg=pos, neg_reg=neg)
    teacher = SimpleNamespace(logits=logits_old, pos_reg=pos_old, neg_reg=neg_old)
    loss, parts = method(student, teacher, labels)
    terms = dkd_terms(logits, logits_old, pos, pos_old, neg, neg_old, labels, 15, 5, 1.5)
    weights = {"mbce": 1.0, "kd": 3.0, "dkd_pos": 5.0, "dkd_neg": 5.0, "ac": 0.5}
    assert list(parts) == [*weights, "total"]
    for k, w in weights.items():
        assert parts[k].item() == pytest.approx(w * terms[k].item(), rel=1e-12)
    assert loss.item() == pytest.approx(sum(w * terms[k].item() for k, w in weights.items()))
    assert method.needs_teacher
    # step 0: mbce with the step-0 pos_weight (2) over the 15 classes, and ac; no teacher
    step0 = build_method(cfg, TASK, 0)
    assert not step0.needs_teacher
    logits0 = torch.randn(2, 16, 5, 3, dtype=torch.float64)
    labels0 = torch.randint(0, 16, (2, 5, 3))
    _, parts0 = step0(SimpleNamespace(logits=logits0), None, labels0)
    t0 = dkd_terms(logits0, None, None, None, None, None, labels0, 0, 15, 2.0)
    assert list(parts0) == ["mbce", "ac", "total"]
    assert parts0["mbce"].item() == pytest.approx(t0["mbce"].item(), rel=1e-12)
    assert parts0["ac"].item() == pytest.approx(0.5 * t0["ac"].item(), rel=1e-12)


# --------------------------------------------------------------------------------------
# Classifier, reasoning maps, prediction rule, initialisation
# --------------------------------------------------------------------------------------


def test_prediction_rule_is_dkds_not_the_argmax():
    # channels: auxiliary, classes 1..3; one pixel per column
    logits = torch.tensor([[9.0, -9.0, -9.0, -9.0, 9.0],     # auxiliary: never predicted
                           [0.1, -1.0, 2.0, 0.0, 1.0],
                           [-0.2, -2.0, 2.0, -1.0, 3.0],
                           [-3.0, -0.5, 1.0, -1.0, 2.0]]).view(1, 4, 1, 5)
    # s > 0.5 -> its class; none above 0.5 (s(0) = 0.5 is not) -> background; ties -> first
    assert dkd_predict(logits).tolist() == [[[1, 0, 1, 0, 2]]]
    assert logits.argmax(1).tolist() != [[[1, 0, 1, 0, 2]]]
    assert dkd_predict(logits.to(torch.bfloat16)).tolist() == [[[1, 0, 1, 0, 2]]]
    dkd_model = DeepLabV3("resnet18", [4], head_channels=8, classifier="dkd")
    standard = DeepLabV3("resnet18", [4], head_channels=8)
    assert dkd_model.predict(logits).tolist() == [[[1, 0, 1, 0, 2]]]
    assert torch.equal(standard.predict(logits), logits.argmax(1))


def _constant_dkd_model():
    """A DKD model whose logits are its biases everywhere: auxiliary -9, classes -1 and -2."""
    model = DeepLabV3("resnet18", [3], head_channels=8, classifier="dkd")
    with torch.no_grad():
        for conv in (model.classifier.aux, *model.classifier.heads):
            conv.weight.zero_()
        model.classifier.aux.bias.fill_(-9.0)
        model.classifier.heads[0].bias.copy_(torch.tensor([-1.0, -2.0]))
    return model


def test_evaluation_uses_the_models_prediction_rule():
    from icd_dist.train.validation import evaluate

    model = _constant_dkd_model()
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, :8] = 1
    batch = SimpleNamespace(images=torch.randn(2, 3, 32, 32), labels=labels, bad_samples=[],
                            skipped=0)
    cm, _ = evaluate(model, [batch], 3, torch.device("cpu"))
    # no class above 0.5 anywhere: DKD predicts background everywhere (argmax would say 1)
    assert cm.matrix[:, 0].sum().item() == 2 * 32 * 32 and cm.matrix[:, 1:].sum().item() == 0


def test_forward_gives_reasoning_maps_and_detaches_the_auxiliary_input():
    torch.manual_seed(0)
    model = DeepLabV3("resnet18", [4, 2], head_channels=8, classifier="dkd")
    x = torch.randn(2, 3, 33, 31)
    out = model(x)
    assert out.logits.shape == (2, 6, 33, 31) and out.head_logits.shape[1] == 6
    head = out.features[-1]
    w = torch.cat([h.weight for h in model.classifier.heads])[:, :, 0, 0]  # (5, 8)
    pos = torch.einsum("nchw,kc->nkhw", head, w.clamp(min=0))
    neg = torch.einsum("nchw,kc->nkhw", head, w.clamp(max=0))
    torch.testing.assert_close(out.pos_reg, pos)
    torch.testing.assert_close(out.neg_reg, neg)
    assert out.pos_reg.shape == (2, 5, *head.shape[-2:])
    # the auxiliary logit trains its own classifier only (DKD feeds it detached features)
    out.head_logits[:, 0].sum().backward()
    assert model.classifier.aux.weight.grad is not None
    assert all(p.grad is None or not p.grad.any() for p in model.head.parameters())
    # reasoning maps reach only the weights' positive / negative entries
    model.zero_grad()
    model(x).pos_reg.sum().backward()
    gw = model.classifier.heads[0].weight.grad[:, :, 0, 0]
    assert torch.all(gw[model.classifier.heads[0].weight[:, :, 0, 0] <= 0] == 0)
    assert model.classifier.aux.weight.grad is None
    standard = DeepLabV3("resnet18", [4], head_channels=8)(x)
    assert standard.pos_reg is None and standard.neg_reg is None


def test_classifier_layout_and_kaiming_normal_init():
    c = DKDClassifier(256, [16, 5, 1])
    assert c.classes_per_step == [16, 5, 1] and c.num_classes == 22
    assert [h.out_channels for h in c.heads] == [15, 5, 1] and c.aux.out_channels == 1
    big = DKDClassifier(256, [2001])
    # DKD's _init_classifier: kaiming_normal_ (fan-in, ReLU gain): std sqrt(2 / 256)
    assert big.heads[0].weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.03)
    assert abs(big.heads[0].weight.mean().item()) < 0.003
    with pytest.raises(ValueError, match="besides background"):
        DKDClassifier(8, [1, 2])


def test_new_classifier_copies_the_auxiliary_one():
    torch.manual_seed(0)
    c = DKDClassifier(8, [4])
    with torch.no_grad():
        c.aux.bias.fill_(-3.0)
    before = copy.deepcopy(c.state_dict())
    c.add_step(3)
    for k, v in before.items():  # the auxiliary and old classifiers are untouched
        assert torch.equal(c.state_dict()[k], v), k
    new = c.heads[1]
    assert torch.equal(new.weight, c.aux.weight.expand(3, -1, -1, -1))
    assert torch.equal(new.bias, torch.full((3,), -3.0))
    x = torch.randn(2, 8, 5, 7)
    logits = c(x)  # every new class starts as the auxiliary logit
    torch.testing.assert_close(logits[:, -3:], logits[:, :1].expand(-1, 3, -1, -1))
    c.add_step(2, aux_init=False)  # DKD without its AC loss: a random init
    assert not torch.equal(c.heads[2].weight, c.aux.weight.expand(2, -1, -1, -1))


def _old_model(norm="batchnorm"):
    torch.manual_seed(1)
    old = DeepLabV3("resnet18", [16], head_channels=8, norm=norm, classifier="dkd")
    with torch.no_grad():
        old.classifier.aux.bias.fill_(-2.5)
        old.classifier.heads[0].bias.normal_()
    return old


def _student(cfg, step=1, old=None):
    """(teacher model, student, method) at `step`: step 0 a fresh model, step 1 the old
    model's weights plus the new classifier (the method's init_student)."""
    old = old or _old_model(cfg.model.norm)
    student = DeepLabV3("resnet18", [16], head_channels=8, norm=cfg.model.norm,
                        classifier="dkd")
    method = build_method(cfg, TASK, step)
    if step > 0:
        method.init_student(student, old.state_dict())
    return old, student, method


def test_method_initialises_new_classes_from_the_auxiliary_classifier():
    old, student, _ = _student(cfg_for())
    assert student.classifier.classes_per_step == [16, 5]
    assert torch.equal(student.classifier.heads[1].weight,
                       old.classifier.aux.weight.expand(5, -1, -1, -1))
    assert torch.equal(student.classifier.heads[1].bias, torch.full((5,), -2.5))
    assert torch.equal(student.classifier.heads[0].bias, old.classifier.heads[0].bias)
    _, random, _ = _student(cfg_for("loss.dkd.ac=0"))  # as DKD's train_voc.py with ac 0
    assert not torch.equal(random.classifier.heads[1].bias, torch.full((5,), -2.5))


def test_teacher_shared_from_arrays_builds_dkds_model():
    from icd_dist.train.teacher_share import build_teacher, state_to_numpy

    cfg = cfg_for("model.backbone=resnet18", "model.head_channels=8")
    old = _old_model()
    teacher = build_teacher(state_to_numpy(old.state_dict()), cfg.model, [16],
                            torch.device("cpu"))
    x = torch.randn(2, 3, 32, 32)
    old.eval()
    out, ref = teacher(x), old(x)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.pos_reg, ref.pos_reg)


# --------------------------------------------------------------------------------------
# Recipe: frozen norm layers and dropout at t > 0, optimiser groups, BN momentum
# --------------------------------------------------------------------------------------


def _train_one_step(cfg, step, old=None):
    old, student, method = _student(cfg, step, old)
    teacher = freeze(copy.deepcopy(old))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(method.param_groups(student, params, 0.05), lr=0.05, momentum=0.9)
    student.train()
    method.set_train_mode(student)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 48, 48)
    labels = torch.randint(0, 21, (2, 48, 48))
    labels[labels < 16] = 0
    before = copy.deepcopy(student.state_dict())
    out = student(x)
    with torch.no_grad():
        again = student(x)
    loss, _ = method(out, teacher(x) if step > 0 else None,
                     labels if step > 0 else labels.clamp(max=15))
    loss.backward()
    opt.step()
    return student, before, out, again


def _bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_incremental_step_freezes_batchnorm_and_dropout():
    student, before, out, again = _train_one_step(cfg_for(), 1)
    after = student.state_dict()
    for name, m in student.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            for k in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias"):
                assert torch.equal(after[f"{name}.{k}"], before[f"{name}.{k}"]), f"{name}.{k}"
            assert not m.training and not m.weight.requires_grad
        if isinstance(m, nn.Dropout):
            assert not m.training
    # dropout off and statistics fixed: two forwards in training mode agree
    torch.testing.assert_close(out.logits, again.logits)
    # ... while the convolutions did learn
    assert not torch.equal(after["head.conv.0.weight"], before["head.conv.0.weight"])
    assert not torch.equal(after["classifier.heads.1.weight"],
                           before["classifier.heads.1.weight"])


def test_batchnorm_learns_at_step0_and_without_freeze_bn():
    for cfg, step in ((cfg_for(), 0), (cfg_for("loss.dkd.freeze_bn=false"), 1)):
        student, before, _, _ = _train_one_step(cfg, step)
        after = student.state_dict()
        assert not torch.equal(after["backbone.bn1.running_mean"],
                               before["backbone.bn1.running_mean"]), (step, cfg.loss.dkd)
        assert not torch.equal(after["head.conv.1.weight"], before["head.conv.1.weight"])
        # DKD's trainer calls freeze_dropout() at every t > 0, whatever --freeze_bn says
        dropouts = [m.training for m in student.modules() if isinstance(m, nn.Dropout)]
        assert dropouts and all(dropouts) == (step == 0), (step, dropouts)


def test_dkd_trains_its_own_aspp_with_kaiming_init():
    torch.manual_seed(0)
    student = DeepLabV3("resnet18", [16], head_channels=64, classifier="dkd")  # head auto
    assert student.head_kind == "deeplabv3"
    assert any(isinstance(m, nn.Dropout) for m in student.head.modules())
    w = student.head.conv[0].weight  # 3x3, 64 -> 64: kaiming_normal_ std sqrt(2 / fan_in)
    fan_in = w.shape[1] * w.shape[2] * w.shape[3]
    assert abs(w.std().item() / (2 / fan_in) ** 0.5 - 1) < 0.03


def test_bf16_autocast_and_bf16_teacher_give_float32_terms_near_fp32():
    old, student, method = _student(cfg_for())
    teacher32, teacher16 = freeze(copy.deepcopy(old)), freeze(copy.deepcopy(old), torch.bfloat16)
    torch.manual_seed(4)
    x = torch.randn(2, 3, 48, 48)
    labels = torch.randint(0, 21, (2, 48, 48))
    labels[labels < 16] = 0
    student.train()
    method.set_train_mode(student)  # t > 0: no dropout, fixed statistics: forwards comparable
    _, parts32 = method(student(x), teacher32(x), labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = student(x)
        loss, parts16 = method(out, teacher16(x.to(torch.bfloat16)), labels)
    assert out.logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    for k, v in parts32.items():
        assert parts16[k].dtype == torch.float32
        assert parts16[k].item() == pytest.approx(v.item(), rel=0.05, abs=1e-3), k
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_backbone_batchnorm_momentum_is_dkds():
    _, student, method = _student(cfg_for(), 0)
    student.train()
    method.set_train_mode(student)
    assert {m.momentum for m in _bn_layers(student.backbone)} == {0.01}
    assert {m.momentum for m in _bn_layers(student.head)} == {0.1}


def test_groupnorm_affine_weights_are_frozen_at_incremental_steps():
    cfg = cfg_for("model.norm=groupnorm")
    student, before, _, _ = _train_one_step(cfg, 1, _old_model("groupnorm"))
    after = student.state_dict()
    gns = [n for n, m in student.named_modules() if isinstance(m, nn.GroupNorm)]
    assert gns and all(torch.equal(after[f"{n}.weight"], before[f"{n}.weight"]) for n in gns)


def test_optimiser_groups_are_dkds():
    model = DeepLabV3("resnet18", [16], head_channels=8, classifier="dkd")
    params = [p for p in model.parameters() if p.requires_grad]
    groups = build_method(cfg_for(), TASK, 0).param_groups(model, params, 0.001)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("backbone", 0.001, 1e-4), ("head", pytest.approx(0.01), 1e-4),
        ("classifier", pytest.approx(0.01), 1e-4)]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(map(id, params))
    _, student, method = _student(cfg_for())
    params = [p for p in student.parameters() if p.requires_grad]
    groups = method.param_groups(student, params, 0.0001)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("backbone", 0.0001, 0.0), ("head", pytest.approx(0.001), 0.0),
        ("classifier", pytest.approx(0.001), 0.0), ("new classifier", pytest.approx(0.001),
                                                     1e-4)]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(map(id, params))
    named = dict(student.named_parameters())
    assert {id(named[k]) for k in ("classifier.aux.weight", "classifier.heads.0.bias")} <= \
        {id(p) for p in groups[2]["params"]}
    assert {id(p) for p in groups[3]["params"]} == {
        id(named["classifier.heads.1.weight"]), id(named["classifier.heads.1.bias"])}
    assert id(named["backbone.bn1.weight"]) not in {id(p) for p in params}  # frozen
    extra = nn.Parameter(torch.zeros(2))  # a parameter outside the model keeps the base lr
    groups = method.param_groups(student, [*params, extra], 0.0001)
    assert groups[-1]["name"] == "other" and groups[-1]["params"] == [extra]


# --------------------------------------------------------------------------------------
# Config, step-0 key, shipped configs, sweeps
# --------------------------------------------------------------------------------------


def test_config_section_is_validated():
    with pytest.raises(ConfigError, match=r"loss\.dkd\.kdd: unknown key; allowed keys at "
                                          r"'loss\.dkd': mbce, kd, .*did you mean 'loss\.dkd\.kd'"):
        cfg_for("loss.dkd.kdd=1")
    with pytest.raises(ConfigError, match=r"loss\.dkd\.kd: must be a number >= 0"):
        cfg_for("loss.dkd.kd=-1")
    with pytest.raises(ConfigError, match=r"loss\.dkd\.pos_weight: must be a positive number"):
        cfg_for("loss.dkd.pos_weight=0")
    with pytest.raises(ConfigError, match=r"loss\.dkd\.freeze_bn: expected true or false"):
        cfg_for("loss.dkd.freeze_bn=maybe")
    with pytest.raises(ConfigError, match=r"model\.classifier: expected one of 'standard', "
                                          r"'dkd'"):
        cfg_for("model.classifier=sigmoid")
    with pytest.raises(ConfigError, match=r"method\.name: expected one of .*'dkd'"):
        cfg_for("method.name=dkdd")


def test_method_and_classifier_must_match():
    base = ["data.dataset=voc", "task.name=15-5"]
    with pytest.raises(ConfigError, match="model.classifier: method 'dkd' trains the 'dkd'"):
        build_method(load_config(None, [*base, "method.name=dkd"]), TASK, 0)
    with pytest.raises(ConfigError, match="model.classifier: method 'icd' trains the "
                                          "'standard'"):
        build_method(load_config(None, [*base, "model.classifier=dkd"]), TASK, 1)
    with pytest.raises(ConfigError, match="loss.seg"):
        build_method(cfg_for("loss.seg=ce"), TASK, 1)
    with pytest.raises(ConfigError, match="model.mib_init"):
        build_method(cfg_for("model.mib_init=true"), TASK, 1)
    with pytest.raises(ConfigError, match="besides background"):
        build_method(cfg_for("task.steps=[[0],[1,2]]"), get_task("voc", [[0], [1, 2]]), 0)


def _key(cfg, task_name="2-1"):
    from icd_dist.train.step0 import step0_identity, step0_key

    task = get_task(generic_spec("synthetic", 5), task_name, "overlap")
    return step0_key(step0_identity(cfg, task, ["a", "b"]))


def test_step0_key_separates_dkds_step0_and_keeps_the_ce_ones():
    from icd_dist.train.step0 import step0_identity

    demo = load_config("configs/tune/demo.yaml")
    dkd_cfg = update(demo, {"method.name": "dkd", "model.classifier": "dkd",
                           "loss.lambda_kd": 0.0})
    assert _key(dkd_cfg) != _key(demo)
    assert _key(dkd_cfg) != _key(update(demo, {"method.name": "dkd"}))  # the classifier alone
    # the CE step 0's identity is what it was before model.classifier existed
    task = get_task(generic_spec("synthetic", 5), "2-1", "overlap")
    identity = step0_identity(demo, task, ["a"])
    assert "classifier" not in identity["model"] and "method" not in identity
    assert step0_identity(dkd_cfg, task, ["a"])["method"] == {"dkd": {
        "mbce": 1.0, "ac": 1.0, "pos_weight_step0": 2.0, "head_lr_factor": 10.0}}
    # weights of later steps share DKD's step 0; what trains its step 0 does not
    for key, value in (("loss.dkd.kd", 1.0), ("loss.dkd.dkd_pos", 2.0), ("loss.dkd.dkd_neg", 0.0),
                       ("loss.dkd.pos_weight", 3.0), ("loss.dkd.freeze_bn", False),
                       ("optim.lr_incremental", 0.1)):
        assert _key(update(dkd_cfg, {key: value})) == _key(dkd_cfg), key
    for key, value in (("loss.dkd.mbce", 2.0), ("loss.dkd.ac", 0.0),
                       ("loss.dkd.pos_weight_step0", 35.0), ("loss.dkd.head_lr_factor", 1.0),
                       ("optim.lr", 0.1)):
        assert _key(update(dkd_cfg, {key: value})) != _key(dkd_cfg), key


def test_step0_from_a_ce_step0_is_refused_for_dkd(tmp_path):
    from icd_dist.train.run_folder import RunFolder
    from icd_dist.train.step0 import check_step0_source, step0_identity

    task = get_task("camvid", "6-5")

    def identity(cfg):
        return step0_identity(cfg, task, ["a"])

    for with_identity in (True, False):  # a step 0 with its identity file, or from before
        for method, name in (("ft", "ce"), ("dkd", "dkd")):
            cfg = load_config(f"configs/camvid/6-5_{method}.yaml")
            source = RunFolder(str(tmp_path / f"{name}-{with_identity}"))
            source.write_config(dump_config(cfg))
            source.write_metrics(0, {"classes": list(task.classes_at(0))})
            source.mark_done(0)
            if with_identity:
                source.write_step0_identity(identity(cfg))
        dkd, ce = (RunFolder(str(tmp_path / f"{n}-{with_identity}")) for n in ("dkd", "ce"))
        dkd_cfg = load_config("configs/camvid/6-5_dkd.yaml")
        check_step0_source(dkd_cfg, task, dkd, identity(dkd_cfg))
        dkd_61 = load_config("configs/camvid/6-1_dkd.yaml")
        check_step0_source(dkd_61, task, dkd, identity(dkd_61))
        with pytest.raises(ConfigError, match="model"):
            check_step0_source(dkd_cfg, task, ce, identity(dkd_cfg))
        mib = load_config("configs/camvid/6-5_mib.yaml")
        with pytest.raises(ConfigError, match="model"):
            check_step0_source(mib, task, dkd, identity(mib))
    # a config.yaml written before model.classifier existed still serves a CE run
    legacy = Storage(str(tmp_path / "legacy"))
    text = dump_config(load_config("configs/camvid/6-5_ft.yaml")).replace(
        ", classifier: standard", "").replace("classifier: standard", "")
    assert "classifier" not in text
    legacy.write_bytes("config.yaml", text.encode())
    legacy.write_json("step_0/metrics.json", {"classes": list(task.classes_at(0))})
    legacy.write_bytes("step_0/DONE", b"done\n")
    icd = load_config("configs/camvid/6-5_icd.yaml")
    check_step0_source(icd, task, RunFolder(legacy), identity(icd))


def test_shipped_configs_carry_dkds_recipe():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    files = {}
    for p in sorted(root.glob("*/*_dkd.yaml")):
        if p.parent.name != "tune":
            files.setdefault(p.parent.name, []).append(p.stem.split("_")[0])
    assert files == {"voc": ["10-1", "15-1", "15-5", "19-1", "5-3"],
                     "ade20k": ["100-10", "100-50", "100-5", "50-50"],
                     "camvid": ["6-1", "6-5", "large-2s", "large-4s"]}
    recipes = {  # lr, lr_incremental, batch, epochs, pos_weight step 0 / later, head factor
        "voc": ("sgd", 0.001, 0.0001, 32, 60, 2.0, 1.0, 10.0),
        "ade20k": ("sgd", 0.0025, 0.00025, 24, 100, 35.0, 35.0, 10.0),
        "camvid": ("adamw", 0.002, 0.0005, 8, 60, 2.0, 1.0, 1.0)}
    for dataset, tasks in files.items():
        for task in tasks:
            cfg = load_config(root / dataset / f"{task}_dkd.yaml")
            borrowed = root / dataset / f"{task}_dkd_borrowed.yaml"
            if borrowed.is_file():  # the tuning study's values: only DKD's searched keys moved
                tuned, cfg = cfg, load_config(borrowed)
                searched = {d.key for d in METHODS["dkd"].search_space(cfg)}
                assert tuned == update(cfg, {k: value_at(tuned, k) for k in searched})
            o, d = cfg.optim, cfg.loss.dkd
            assert (cfg.method.name, cfg.model.classifier, cfg.task.name) == ("dkd", "dkd", task)
            assert (o.optimizer, o.lr, o.lr_incremental, o.batch_size, o.epochs,
                    d.pos_weight_step0, d.pos_weight, d.head_lr_factor) == recipes[dataset]
            assert (d.mbce, d.kd, d.dkd_pos, d.dkd_neg, d.ac, d.freeze_bn) == \
                (1.0, 5.0, 5.0, 5.0, 1.0, True)
            if dataset == "camvid":  # the CamVid budgets of every other row
                other = load_config(root / dataset / f"{task}_mib.yaml")
                assert (o.iterations, o.iterations_incremental, cfg.model) == \
                    (other.optim.iterations, other.optim.iterations_incremental,
                     update(other, {"model.classifier": "dkd"}).model)


def test_sweep_searches_dkds_weights():
    from ray.tune.search.sample import Float

    from icd_dist.train.sweep import search_space, sweep_space

    cfg = load_config("configs/tune/camvid_dkd.yaml")
    space = search_space(sweep_space(cfg))
    assert set(space) == {"loss.dkd.kd", "loss.dkd.dkd_pos", "loss.dkd.dkd_neg",
                          "loss.dkd.pos_weight", "optim.lr_incremental"}
    assert isinstance(space["loss.dkd.dkd_pos"], Float)
    assert space["loss.dkd.dkd_pos"].upper == 50.0
    # a decade either side of the camvid DKD config's incremental lr
    assert (space["optim.lr_incremental"].lower, space["optim.lr_incremental"].upper) == \
        pytest.approx((cfg.optim.lr_incremental / 10, cfg.optim.lr_incremental * 10))
    tuned = update(cfg, {"loss.dkd.kd": 2.0, "loss.dkd.dkd_pos": 3.0,
                         "loss.dkd.dkd_neg": 4.0})
    assert (tuned.loss.dkd.kd, tuned.loss.dkd.dkd_pos, tuned.loss.dkd.dkd_neg) == (2.0, 3.0, 4.0)
    # refused before anything starts: DKD weights for another method, MiB's for DKD
    icd = load_config("configs/tune/camvid_icd.yaml",
                      ["tune.space.loss.dkd.kd={loguniform: [1, 2]}"])
    with pytest.raises(ConfigError, match="tune.space.loss.dkd.kd: method 'icd' does not read"):
        sweep_space(icd)
    with pytest.raises(ConfigError, match="tune.space.loss.lambda_kd: method 'dkd' does not"):
        sweep_space(load_config("configs/tune/camvid_dkd.yaml",
                                ["tune.space.loss.lambda_kd={loguniform: [1, 2]}"]))

"""Engine helpers, the step budget, teacher sharing and run storage (no Ray)."""

import numpy as np
import pytest
import torch

from icd_dist.config import ConfigError, load_config, micro_batch_and_accumulation
from icd_dist.models import DeepLabV3
from icd_dist.train.engine import DDPTrainEngine, poly_lambda
from icd_dist.train.schedule import format_summary_table, write_plots
from icd_dist.train.step_worker import StepBudget, weights_digest
from icd_dist.train.storage import Storage
from icd_dist.train.teacher_share import build_teacher, shares_memory_with, state_to_numpy


def test_poly_schedule():
    f = poly_lambda(10, 0.9)
    assert f(0) == 1.0
    assert f(5) == pytest.approx(0.5 ** 0.9)
    assert f(10) == 0.0 and f(12) == 0.0


@pytest.mark.parametrize(("batch", "workers", "micro", "expected"), [
    (24, 2, None, (12, 1)), (24, 2, 4, (4, 3)), (24, 3, None, (8, 1)), (8, 1, 2, (2, 4)),
])
def test_global_batch_is_kept_by_accumulation(batch, workers, micro, expected):
    cfg = load_config(None, [f"optim.batch_size={batch}", f"engine.num_workers={workers}",
                             f"engine.micro_batch_size={micro if micro else 'null'}"])
    m, a = micro_batch_and_accumulation(cfg)
    assert (m, a) == expected and m * a * workers == batch


def test_indivisible_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.batch_size"):
        load_config(None, ["optim.batch_size=10", "engine.num_workers=3"])


def test_budget_epochs_and_iterations():
    cfg = load_config(None, ["optim.batch_size=8", "engine.num_workers=2", "optim.epochs=3",
                             "optim.epochs_incremental=5"])
    # 100 images, 8 per global batch: 13 optimiser steps per epoch (the last one padded)
    assert StepBudget.of(cfg, 0, 100) == StepBudget(4, 1, 13, 3, 39)
    assert StepBudget.of(cfg, 1, 100) == StepBudget(4, 1, 13, 5, 65)
    assert StepBudget.of(cfg, 0, 96) == StepBudget(4, 1, 12, 3, 36)  # no padding needed
    cfg = load_config(None, ["optim.batch_size=8", "engine.num_workers=2",
                             "engine.micro_batch_size=2", "optim.iterations=10"])
    # 50 images: 7 optimiser steps of 2 micro-batches per epoch, 10 steps in 2 epochs
    assert StepBudget.of(cfg, 0, 50) == StepBudget(2, 2, 14, 2, 10)


def test_ddp_engine_single_process_accumulates():
    torch.manual_seed(0)
    cfg = load_config(None, ["optim.batch_size=8", "engine.num_workers=1",
                             "engine.micro_batch_size=4", "engine.engine=ddp",
                             "engine.zero_stage=0", "optim.optimizer=sgd", "optim.momentum=0",
                             "optim.nesterov=false", "optim.weight_decay=0"])
    lin = torch.nn.Linear(3, 1, bias=False)
    engine = DDPTrainEngine(cfg, lin, lin.parameters(), 0.1, 10, on_gpu=False)
    x = torch.randn(8, 3)
    w0 = lin.weight.detach().clone()
    for half in (x[:4], x[4:]):
        engine.backward(engine.forward(half).sum())
        stepped = engine.end_micro_batch()
    assert stepped and engine.lr() == pytest.approx(0.1 * 0.9 ** 0.9)
    # one SGD step on the mean gradient of the two micro-batches
    expected = w0 - 0.1 * (x[:4].sum(0) + x[4:].sum(0)) / 2
    assert torch.allclose(lin.weight, expected, atol=1e-6)


def test_teacher_built_on_shared_arrays_without_copy():
    model = DeepLabV3("resnet18", [3, 1], head_channels=8, norm="groupnorm")
    arrays = state_to_numpy(model.state_dict())
    for a in arrays.values():
        a.setflags(write=False)  # as the object store hands them out
    cfg = load_config(None, ["model.backbone=resnet18", "model.head_channels=8",
                             "model.norm=groupnorm"])
    teacher = build_teacher(arrays, cfg.model, [3, 1], torch.device("cpu"))
    assert shares_memory_with(teacher, arrays)
    assert weights_digest(teacher) == weights_digest(model)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x).logits, model.eval()(x).logits, atol=1e-6)
    copied = build_teacher(arrays, cfg.model, [3, 1], torch.device("cpu"), torch.bfloat16)
    assert not shares_memory_with(copied, arrays)
    assert next(copied.parameters()).dtype == torch.bfloat16


def test_student_loads_the_shared_teacher_arrays_without_a_private_copy():
    from icd_dist.css import get_task
    from icd_dist.css.classes import generic_spec
    from icd_dist.methods import build_method
    from icd_dist.train.plan import StepJob
    from icd_dist.train.step_worker import build_student

    cfg = load_config(None, ["model.backbone=resnet18", "model.head_channels=8",
                             "model.norm=groupnorm", "method.name=mib"])
    task = get_task(generic_spec("synthetic", 5), "3-2", "overlap")
    old = DeepLabV3("resnet18", [len(task.steps[0])], head_channels=8, norm="groupnorm")
    arrays = state_to_numpy(old.state_dict())
    for a in arrays.values():
        a.setflags(write=False)  # as the object store hands them out
    method = build_method(cfg, task, 1)
    seen = {}
    load = method.init_student

    def spy(model, state):
        seen.update({k: v.data_ptr() for k, v in state.items()})
        load(model, state)
    method.init_student = spy
    job = StepJob(cfg, task, 1, "r", "/unused", "", "", [], [], teacher=arrays)
    student = build_student(job, torch.device("cpu"), method)
    # the state handed to load_state_dict IS the shared memory (load_state_dict copies once)
    assert seen == {k: a.__array_interface__["data"][0] for k, a in arrays.items()}
    assert not shares_memory_with(student, arrays)  # the student owns its weights
    assert torch.equal(student.state_dict()["head.red_conv.weight"],
                       old.state_dict()["head.red_conv.weight"])


def test_local_storage_round_trip(tmp_path):
    storage = Storage(str(tmp_path / "run")).child("step_0")
    storage.write_json("metrics.json", {"a": 1})
    storage.save_torch("model.pt", {"w": torch.ones(2)})
    assert storage.exists("metrics.json") and not storage.exists("nothing")
    assert storage.read_json("metrics.json") == {"a": 1}
    assert torch.equal(storage.load_torch("model.pt")["w"], torch.ones(2))
    assert not list((tmp_path / "run" / "step_0").glob("*.tmp"))


def test_summary_table_and_plots(tmp_path):
    steps = [{"step": 0, "classes": [0, 1, 2], "train_images": 10, "miou_old": 0.5,
              "miou_new": None, "miou_all": 0.5, "hiou": None, "seconds": 3.0,
              "per_class_iou": {"bg": 0.6, "a": 0.4, "b": None}},
             {"step": 1, "classes": [3], "train_images": 4, "miou_old": 0.4, "miou_new": 0.2,
              "miou_all": 0.35, "hiou": 0.2667, "seconds": 2.0,
              "per_class_iou": {"bg": 0.5, "a": 0.3, "b": None, "c": 0.2}}]
    table = format_summary_table(steps)
    assert "0..2" in table and " 50.00" in table and " 26.67" in table
    paths = write_plots(steps, tmp_path)
    assert all(p.is_file() and p.stat().st_size > 1000 for p in paths)
    assert np.all([p.suffix == ".png" for p in paths])


def test_step0_source_is_shared_across_methods_but_not_across_models(tmp_path):
    """--step0-from takes a step 0 only where its identity (step_0/identity.json) says it is
    the run's model (classes, model config, DKD's own step 0); a refusal names the field, and
    the run reports how it was trained otherwise. Without an identity file (a run from
    before them) the classes and the model config decide."""
    from icd_dist.config import dump_config, update
    from icd_dist.css import get_task
    from icd_dist.train.run_folder import RunFolder
    from icd_dist.train.step0 import check_step0_source, step0_identity

    task = get_task("camvid", "6-5")
    keys = ["a", "b", "c"]
    ft = load_config("configs/camvid/6-5_ft.yaml")
    source = RunFolder(str(tmp_path / "step0"))
    source.write_config(dump_config(ft))
    source.storage.write_json("step_0/metrics.json", {"classes": list(task.classes_at(0))})
    source.mark_done(0)
    legacy = RunFolder(str(tmp_path / "step0"))  # no identity yet: the legacy check
    check_step0_source(load_config("configs/camvid/6-5_mib.yaml"), task, legacy,
                       step0_identity(ft, task, keys))
    with pytest.raises(ConfigError, match="^model: step 0 in"):
        bigger = update(ft, {"model.head_channels": 64})
        check_step0_source(bigger, task, legacy, step0_identity(bigger, task, keys))
    source.write_step0_identity(step0_identity(ft, task, keys))
    # PLOP taps pre-activations and ft initialises its head randomly: same step-0 model
    for path in ("configs/camvid/6-5_plop.yaml", "configs/camvid/6-5_mib.yaml",
                 "configs/camvid/6-5_icd.yaml", "configs/camvid/6-1_icd.yaml"):
        cfg = load_config(path)
        check_step0_source(cfg, get_task("camvid", cfg.task.name), source,
                           step0_identity(cfg, get_task("camvid", cfg.task.name), keys))
    assert load_config("configs/camvid/6-5_plop.yaml").model.taps == "pre_activation"
    # another model: refused, naming the field
    for changes, named in (({"model.head_channels": 64},
                            "model.head_channels: .*64 here, 128 there"),
                           ({"model.backbone": "resnet18"}, "model.backbone: ")):
        other = update(ft, changes)
        with pytest.raises(ConfigError, match=named):
            check_step0_source(other, task, source, step0_identity(other, task, keys))
    with pytest.raises(ConfigError, match="^task: .*classes: "):
        check_step0_source(ft, get_task("camvid", [[0, 1], [2]]), source,
                           step0_identity(ft, get_task("camvid", [[0, 1], [2]]), keys))
    # the same model trained otherwise: reported, every field (the legacy check saw none)
    other = update(ft, {"run.seed": 1, "optim.lr": 0.1, "engine.engine": "deepspeed"})
    assert check_step0_source(other, task, source, step0_identity(other, task, ["a"])) == [
        f"train_images: {step0_identity(other, task, ['a'])['train_images']!r} here, "
        f"{step0_identity(ft, task, keys)['train_images']!r} there",
        "optim.lr: 0.1 here, 0.002 there", "engine.engine: 'deepspeed' here, 'ddp' there",
        "seed: 1 here, 0 there"]
    assert check_step0_source(ft, task, source, step0_identity(ft, task, keys)) == []


def test_worker_group_record_and_in_process_teacher_handoff(tmp_path):
    from icd_dist.train.run_folder import RunFolder
    from icd_dist.train.teacher_share import TeacherHandoff

    run = RunFolder(str(tmp_path / "run"))
    assert run.worker_group_starts() == 0
    run.note_worker_group(0)
    run.note_worker_group(1)  # a restart after a failure
    assert run.worker_group_starts() == 2
    model = DeepLabV3("resnet18", [3], head_channels=8, norm="groupnorm")
    run.save_model(0, {"state_dict": model.state_dict()})
    handoff = TeacherHandoff(run, None, rank=0, world=1)
    read = handoff.share(1, None)  # nothing held: step 0's model.pt
    held = handoff.share(1, {k: v + 1 for k, v in model.state_dict().items()
                             if v.is_floating_point()})
    for k, v in model.state_dict().items():
        assert np.array_equal(read[k], v.numpy())
        if v.is_floating_point():
            assert np.array_equal(held[k], (v + 1).numpy())  # the held weights win

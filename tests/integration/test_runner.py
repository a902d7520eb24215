"""The schedule runner on a local Ray with 2 CPU workers: real Ray Train, real DeepSpeed."""

import json
from pathlib import Path

import pytest
import torch

from icd_dist.evaluate import evaluate_run
from icd_dist.models.deeplab import build_model
from icd_dist.train.plan import FAILURE_ENV
from icd_dist.train.schedule import run_schedule
from icd_dist.train.step_worker import weights_digest
from tests.integration.conftest import tiny_config

pytestmark = pytest.mark.integration


def model_digest(run: Path, step: int, cfg) -> str:
    saved = torch.load(run / f"step_{step}" / "model.pt", weights_only=True)
    model = build_model(cfg.model, saved["classes_per_step"], load_pretrained=False)
    model.load_state_dict(saved["state_dict"])
    return weights_digest(model)


def test_two_step_schedule_deepspeed_then_resume_skips(local_ray, tmp_path):
    cfg = tiny_config(tmp_path, "run.name=two-step", "logging.wandb=offline")
    logs = []
    summary = run_schedule(cfg, log=logs.append)
    run = tmp_path / "runs" / "two-step"
    assert [s["step"] for s in summary["steps"]] == [0, 1]
    assert json.loads((run / "summary.json").read_text())["steps"] == summary["steps"]
    for s in summary["steps"]:
        assert 0.0 <= s["miou_all"] <= 1.0 and s["train_images"] > 0
        assert len(s["student_digests"]) == 2
        assert s["student_digests"][0] == s["student_digests"][1]  # identical workers
        assert set(s["per_class_iou"]) >= {"background", "class_1"}
    assert summary["steps"][0]["teacher_digest"] is None
    # the teacher of step 1 is exactly the saved model of step 0, unchanged by training
    assert summary["steps"][1]["teacher_digest"] == model_digest(run, 0, cfg)
    assert summary["steps"][1]["student_digests"][0] == model_digest(run, 1, cfg)
    assert summary["steps"][1]["hiou"] is not None
    # one Ray Train worker group trained both steps
    assert summary["worker_group_starts"] == 1
    assert "2 steps trained by 1 worker group (Ray Train;" in "\n".join(logs)
    for name in ("miou_per_step.png", "per_class_iou.png", "config.yaml"):
        assert (run / name).is_file()
    # W&B offline: a run per step holding its metrics and images
    for step in (0, 1):
        runs = list((run / f"step_{step}" / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        data = next(runs[0].glob("*.wandb")).read_bytes()
        assert b"loss/total" in data and b"eval/miou_all" in data
        assert list((runs[0] / "files" / "media" / "images").rglob("overlays_*.png"))
    # evaluate re-computes the final metrics from the saved model
    again = evaluate_run(str(run), str(tmp_path / "data" / "val"))
    assert again["step"] == 1
    assert again["miou_all"] == pytest.approx(summary["steps"][1]["miou_all"], abs=1e-6)
    # re-running the same name skips finished steps
    logs.clear()
    rerun = run_schedule(cfg, log=logs.append)
    assert rerun["steps"] == summary["steps"]
    assert sum("already complete, skipped" in m for m in logs) == 2


def test_deepspeed_and_ddp_same_loss_curve(tmp_path, capfd):
    """The two engines are one method in fp32: the same loss curve on the same seed (in-process,
    one worker; test_gpu_path.py compares them in bf16 over two Ray workers)."""
    curves = {}
    # DeepSpeed twice: a second in-process fit in the same process trains as the first
    for name, engine in (("ds", "deepspeed"), ("ddp", "ddp"), ("ds-again", "deepspeed")):
        cfg = tiny_config(tmp_path, f"run.name=joint-{name}", "method.name=joint",
                          "task.name=offline", f"engine.engine={engine}", "optim.epochs=2",
                          "optim.optimizer=sgd", "optim.lr=0.05", "engine.launcher=local",
                          "engine.num_workers=1")
        capfd.readouterr()
        summary = run_schedule(cfg, log=lambda m: None)
        # DeepSpeed's log lines ("untested optimizer" for SGD under ZeRO) stay out of an
        # in-process run's console and stdout, as a Ray worker's stay in Ray's logs
        out, err = capfd.readouterr()
        assert "DeepSpeed" not in out + err and "] [WARNING] [" not in out + err, out + err
        curves[name] = summary["steps"][0]["loss_curve"]
    assert len(curves["ds"]) == len(curves["ddp"]) >= 6
    assert curves["ds"] == pytest.approx(curves["ddp"], rel=1e-4, abs=1e-5)
    assert curves["ds-again"] == curves["ds"]


def straight_then_killed(tmp_path, monkeypatch, failure: str, *overrides) -> dict[str, dict]:
    """The summaries of two runs of the tiny config with `overrides` on one local Ray:
    "straight", and "recover", whose worker `failure` ("STEP:EPOCH:RANK") exits abruptly
    once (the driver hands the hook to its workers)."""
    import ray

    summaries = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for name, spec in (("straight", None), ("recover", failure)):
            if spec:
                monkeypatch.setenv(FAILURE_ENV, spec)
            summaries[name] = run_schedule(tiny_config(tmp_path, f"run.name={name}",
                                                       *overrides), log=lambda m: None)
    finally:
        ray.shutdown()
    return summaries


@pytest.mark.parametrize("engine", ["deepspeed", "ddp"])
def test_killed_worker_is_replaced_and_step_resumes_bit_identical(tmp_path, monkeypatch,
                                                                   engine):
    """A worker killed after epoch 0's checkpoint: the group restarts, resumes after epoch 0
    and ends with the weights of the uninterrupted step, bit for bit (the RNG states, the
    optimiser and schedule, and the loaders' epochs restored)."""
    common = ["engine.max_failures=1", "optim.epochs=3", "task.name=offline",
              "method.name=joint", f"engine.engine={engine}"]
    # step 0, epoch 1, rank 1 exits abruptly once
    steps = {name: summary["steps"][0] for name, summary in
             straight_then_killed(tmp_path, monkeypatch, "0:1:1", *common).items()}
    cfg = tiny_config(tmp_path, *common)
    run = tmp_path / "runs" / "recover"
    assert (run / "failures" / "failed_0_1_1").is_file()  # the failure did happen
    step = steps["recover"]
    assert step["resumed_from_epoch"] == 1  # restarted from the epoch-0 checkpoint
    assert step["student_digests"][0] == step["student_digests"][1]
    assert (run / "step_0" / "DONE").is_file()
    straight = steps["straight"]
    assert straight["resumed_from_epoch"] == 0
    assert step["iterations"] == straight["iterations"]
    assert step["loss_curve"] == straight["loss_curve"]  # every optimiser step, both attempts
    assert step["student_digests"] == straight["student_digests"]  # bit-identical weights
    assert model_digest(run, 0, cfg) == model_digest(tmp_path / "runs" / "straight", 0, cfg)


def test_in_process_launcher_equals_one_ray_worker_over_three_steps(tmp_path):
    """engine.launcher=local (no Ray) and one Ray worker: the same weights at every step of a
    3-step schedule, each trained by one worker group."""
    import ray

    common = ["task.steps=[[0,1],[2],[3]]", "engine.num_workers=1", "engine.engine=ddp",
              "optim.epochs=1"]
    local = run_schedule(tiny_config(tmp_path, "run.name=local", "engine.launcher=local",
                                     *common), log=lambda m: None)
    assert not ray.is_initialized()  # the in-process launcher starts no Ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_schedule(tiny_config(tmp_path, "run.name=ray", *common),
                              log=lambda m: None)
    finally:
        ray.shutdown()
    assert [s["step"] for s in local["steps"]] == [0, 1, 2]
    assert local["worker_group_starts"] == remote["worker_group_starts"] == 1
    for a, b in zip(local["steps"], remote["steps"], strict=True):
        assert a["student_digests"] == b["student_digests"]
        assert a["teacher_digest"] == b["teacher_digest"]
        assert a["loss_curve"] == b["loss_curve"]


def test_killed_worker_in_a_later_step_resumes_that_step_bit_identical(tmp_path, monkeypatch):
    """One fit trains both steps; a worker killed in step 1 restarts the worker group, which
    skips step 0 (DONE), takes step 1's teacher from step 0's model.pt and resumes step 1
    from its epoch-0 checkpoint: the weights of the uninterrupted schedule, bit for bit."""
    # step 1, epoch 1, rank 1 exits abruptly once
    summaries = straight_then_killed(tmp_path, monkeypatch, "1:1:1", "engine.max_failures=1",
                                     "engine.engine=ddp")
    assert (tmp_path / "runs" / "recover" / "failures" / "failed_1_1_1").is_file()
    straight, recover = summaries["straight"], summaries["recover"]
    assert straight["worker_group_starts"] == 1 and recover["worker_group_starts"] == 2
    assert recover["steps"][1]["resumed_from_epoch"] == 1
    for a, b in zip(straight["steps"], recover["steps"], strict=True):
        assert a["student_digests"] == b["student_digests"]
        assert a["loss_curve"] == b["loss_curve"]
        assert a["teacher_digest"] == b["teacher_digest"]

"""DKD through the runner on a local Ray (2 CPU workers): its own step 0, two incremental
steps on DeepSpeed with frozen BatchNorm statistics, the same workers' weights, its loss
components in W&B, `evaluate` with its prediction rule, then an incremental step on DDP with
bf16 autocast and a bf16 teacher from that step 0 (--step0-from)."""

import pytest
import torch

from icd_dist.evaluate import evaluate_run
from icd_dist.train.schedule import run_schedule
from tests.integration.conftest import tiny_config

pytestmark = pytest.mark.integration
DKD = ["method.name=dkd", "model.classifier=dkd", "model.norm=batchnorm",
       "task.steps=[[0,1],[2],[3]]", "task.name=2-1-1", "optim.iterations=4",
       "optim.iterations_incremental=3", "optim.lr=0.01", "optim.lr_incremental=0.001"]


def state(run, step):
    return torch.load(run / f"step_{step}" / "model.pt", weights_only=True)["state_dict"]


def test_dkd_schedule_deepspeed_and_ddp(local_ray, tmp_path):
    logs = []
    summary = run_schedule(tiny_config(tmp_path, *DKD, "run.name=dkd", "logging.wandb=offline"),
                           log=logs.append)
    run = tmp_path / "runs" / "dkd"
    assert summary["complete"] and [s["step"] for s in summary["steps"]] == [0, 1, 2]
    for s in summary["steps"]:
        assert 0.0 <= s["miou_all"] <= 1.0
    # identical workers at t > 0, where DKD freezes the BatchNorm statistics (at step 0 each
    # CPU worker keeps its own: SyncBatchNorm is for GPUs, and DeepSpeed does not broadcast
    # buffers)
    for s in summary["steps"][1:]:
        assert s["student_digests"][0] == s["student_digests"][1]
    assert any("mbce" in m and "ac" in m and "dkd_pos" not in m for m in logs
               if m.startswith("step 0 epoch"))
    assert any("dkd_pos" in m and "dkd_neg" in m and " kd " in m for m in logs
               if m.startswith("step 1 epoch"))
    s0, s1, s2 = (state(run, t) for t in range(3))
    assert {k for k in s2 if k.startswith("classifier.")} == {
        "classifier.aux.weight", "classifier.aux.bias", *(f"classifier.heads.{i}.{p}"
                                                          for i in range(3)
                                                          for p in ("weight", "bias"))}
    stats = [k for k in s0 if "running_" in k or "num_batches" in k]
    assert stats
    # step 0 trains the statistics; steps 1 and 2 keep them, and the norm layers' weights
    assert any(not torch.equal(s0[k], torch.zeros_like(s0[k])) for k in stats)
    for k in stats + [k.replace("running_mean", "weight") for k in stats if "running_mean" in k]:
        assert torch.equal(s1[k], s0[k]) and torch.equal(s2[k], s1[k]), k
    assert not torch.equal(s1["head.conv.0.weight"], s0["head.conv.0.weight"])
    data = next((run / "step_1" / "wandb").glob("offline-run-*/*.wandb")).read_bytes()
    assert b"loss/dkd_pos" in data and b"loss/mbce" in data
    again = evaluate_run(str(run), str(tmp_path / "data" / "val"))
    assert again["step"] == 2
    assert again["miou_all"] == pytest.approx(summary["steps"][2]["miou_all"], abs=1e-6)

    ddp = tiny_config(tmp_path, *DKD, "run.name=dkd-ddp", "engine.engine=ddp",
                      "engine.precision=bf16", "engine.teacher_dtype=bf16")
    other = run_schedule(ddp, log=logs.append, last_step=1, step0_from=str(run))
    assert other["steps"][0]["student_digests"] == summary["steps"][0]["student_digests"]
    assert other["steps"][1]["student_digests"][0] == other["steps"][1]["student_digests"][1]
    assert (other["steps"][1]["precision"], other["steps"][1]["teacher_dtype"]) == \
        ("bf16", "bfloat16")
    d1 = state(tmp_path / "runs" / "dkd-ddp", 1)
    assert all(torch.equal(d1[k], s0[k]) for k in stats)

"""A step 0 trained once (--last-step 0) and taken by another run (--step0-from), and
learned MSCA through the runner: trained at step 1, synchronised across the two DeepSpeed
workers, carried frozen into step 2. A step 0 of another model or other classes is refused."""

import pytest
import torch

from icd_dist.config import ConfigError
from icd_dist.train.schedule import run_schedule
from tests.integration.conftest import tiny_config

pytestmark = pytest.mark.integration
THREE_STEPS = ["task.steps=[[0,1],[2],[3]]", "task.name=2-1-1", "optim.iterations=4",
               "optim.iterations_incremental=4"]


def msca_weights(run, step):
    state = torch.load(run / f"step_{step}" / "model.pt", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("msca.")}


def test_shared_step0_then_learned_msca_trained_once_and_carried(local_ray, tmp_path):
    logs = []
    # the source step 0 in-process (one worker): what it trained is taken as it is
    source = run_schedule(tiny_config(tmp_path, *THREE_STEPS, "method.name=ft",
                                      "run.name=step0", "engine.launcher=local",
                                      "engine.num_workers=1"), log=logs.append, last_step=0)
    assert [s["step"] for s in source["steps"]] == [0] and source["complete"] is False
    assert not (tmp_path / "runs" / "step0" / "step_1").exists()

    cfg = tiny_config(tmp_path, *THREE_STEPS, "loss.icd.msca=learned", "run.name=learned")
    summary = run_schedule(cfg, log=logs.append, step0_from=str(tmp_path / "runs" / "step0"))
    assert any("step 0: taken from" in m for m in logs)
    assert summary["complete"] and [s["step"] for s in summary["steps"]] == [0, 1, 2]
    assert summary["steps"][0]["student_digests"] == source["steps"][0]["student_digests"]
    run = tmp_path / "runs" / "learned"
    assert msca_weights(run, 0) == {}  # step 0 has no distillation and stays shareable
    trained, carried = msca_weights(run, 1), msca_weights(run, 2)
    assert set(trained) == {"msca.w5", "msca.w1x7", "msca.w7x1", "msca.w1x11", "msca.w11x1",
                            "msca.w1x21", "msca.w21x1"}
    # trained at step 1: moved away from the averaging kernels it starts from
    assert not torch.allclose(trained["msca.w5"], torch.full((1, 1, 5, 5), 1 / 25))
    # frozen from step 2 on: exactly what step 1 left
    assert all(torch.equal(trained[k], carried[k]) for k in trained)
    # the steps this run trained: both workers end with the same weights, MSCA included
    for step in summary["steps"][1:]:
        assert step["student_digests"][0] == step["student_digests"][1]

    # a step 0 of another model or other classes is refused before anything trains
    cfg = tiny_config(tmp_path, *THREE_STEPS, "model.head_channels=16", "run.name=other")
    with pytest.raises(ConfigError, match="model"):
        run_schedule(cfg, log=lambda m: None, step0_from=str(tmp_path / "runs" / "step0"))
    cfg = tiny_config(tmp_path, "task.steps=[[0,1,2],[3]]", "task.name=3-1", "run.name=cls")
    with pytest.raises(ConfigError, match=r"^task: .*classes: \[0, 1, 2\] here, \[0, 1\] there"):
        run_schedule(cfg, log=lambda m: None, step0_from=str(tmp_path / "runs" / "step0"))

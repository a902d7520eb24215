"""The GPU defaults, forced on CPU: DALI (its CPU operators), DeepSpeed in bf16 with the fp32
teacher under the student's autocast, 2 workers with gradient accumulation; and bf16 with one
meaning for both engines. Dtypes are checked as the workers observed them in training."""

import pytest
import torch

from icd_dist.train.schedule import run_schedule
from tests.integration.conftest import tiny_config
from tests.integration.test_runner import model_digest

pytestmark = pytest.mark.integration

# micro-batch 2 on each of 2 workers, accumulation 2: a global batch of 8
GPU_DEFAULTS = ["engine.engine=deepspeed", "engine.precision=bf16",
                "data.pipeline=dali", "engine.num_workers=2", "engine.micro_batch_size=2",
                "optim.batch_size=8", "data.synthetic.num_train=30",
                # 64 pixels: PLOP's finest POD regions (side W // 4) need 4x4 feature maps
                "data.synthetic.height=64", "data.synthetic.width=64", "data.crop_size=64",
                "data.eval_size=64"]


def test_plop_and_icd_steps_on_the_gpu_defaults(local_ray, tmp_path):
    plop = tiny_config(tmp_path, "run.name=plop", "method.name=plop", *GPU_DEFAULTS)
    summary = run_schedule(plop, log=lambda m: None)
    # ICD's step 1 from the same step 0 (PLOP's pre-activation taps change no weight)
    icd = tiny_config(tmp_path, "run.name=icd", "method.name=icd", *GPU_DEFAULTS)
    icd_summary = run_schedule(icd, log=lambda m: None,
                               step0_from=str(tmp_path / "runs" / "plop"))
    for steps in (summary["steps"], icd_summary["steps"]):
        for s in steps:
            assert s["precision"] == "bf16" and s["weights_dtype"] == "float32"
            # every rank ran the same whole number of optimiser steps' micro-batches
            counts = s["micro_batches_per_rank"]
            assert counts[0] == counts[1] and counts[0] % 2 == 0 and counts[0] > 0
            assert s["iterations"] == counts[0] // 2
            assert s["student_digests"][0] == s["student_digests"][1]
            assert s["observed_dtypes"]["taps"] == ["bfloat16"] * 5
            assert s["observed_dtypes"]["logits"] == "bfloat16"
        step1 = steps[1]
        # the teacher keeps fp32 weights and runs under the student's autocast
        assert step1["teacher_dtype"] == "float32"
        assert step1["observed_dtypes"]["teacher_logits"] == "bfloat16"
        assert 0.0 <= step1["miou_all"] <= 1.0
        assert all(torch.isfinite(torch.tensor(step1["loss_curve"])))
    assert summary["steps"][1]["train_images"] > 0


def test_bf16_is_the_same_method_in_both_engines(local_ray, tmp_path):
    """DeepSpeed-bf16 and DDP-bf16: the same loss curve (within 1e-3 relative: the two
    engines reduce gradients in different orders), fp32 weights throughout, and model.pt
    holding exactly the engine's (fp32 master) weights, BatchNorm included."""
    steps, cfgs = {}, {}
    for engine in ("deepspeed", "ddp"):
        cfgs[engine] = tiny_config(tmp_path, f"run.name=bf16-{engine}", "method.name=joint",
                                   "task.name=offline", f"engine.engine={engine}",
                                   "engine.precision=bf16", "model.norm=batchnorm",
                                   "optim.epochs=2", "optim.optimizer=sgd", "optim.lr=0.05")
        steps[engine] = run_schedule(cfgs[engine], log=lambda m: None)["steps"][0]
    curves = {k: s["loss_curve"] for k, s in steps.items()}
    assert len(curves["deepspeed"]) == len(curves["ddp"]) >= 6
    assert curves["deepspeed"] == pytest.approx(curves["ddp"], rel=1e-3, abs=1e-4)
    for engine, s in steps.items():
        assert s["precision"] == "bf16" and s["weights_dtype"] == "float32"
        assert s["observed_dtypes"]["logits"] == "bfloat16", engine
        run = tmp_path / "runs" / f"bf16-{engine}"
        assert model_digest(run, 0, cfgs[engine]) == s["student_digests"][0]
        saved = torch.load(run / "step_0" / "model.pt", weights_only=True)["state_dict"]
        running = [v for k, v in saved.items() if k.endswith("running_var")]
        assert running and all(v.dtype == torch.float32 for v in running)

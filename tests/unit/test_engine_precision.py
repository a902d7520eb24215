"""What bf16 and fp16 mean in the engines (no Ray): bf16 is autocast over fp32 weights on CPU
too, with the optimiser updating the fp32 weights and normalisation layers keeping fp32
weights and statistics; an optimiser step skipped by fp16 loss scaling does not advance the
poly schedule."""

import pytest
import torch
from torch import nn

from icd_dist.config import load_config
from icd_dist.train.engine import DDPTrainEngine, DeepSpeedTrainEngine, resolve_precision
from icd_dist.train.step_worker import StepBudget

BASE = ["optim.batch_size=4", "engine.num_workers=1", "engine.micro_batch_size=4",
        "engine.engine=ddp", "optim.optimizer=sgd", "optim.momentum=0", "optim.nesterov=false",
        "optim.weight_decay=0"]


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 2, 1))


def test_precision_choices_on_cpu():
    cfg = load_config(None, ["engine.precision=bf16"])
    assert resolve_precision(cfg, on_gpu=False) == "bf16"
    assert resolve_precision(load_config(None, ["engine.precision=auto"]), False) == "fp32"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision(load_config(None, ["engine.precision=fp16"]), on_gpu=False)


def test_bf16_is_autocast_over_fp32_weights():
    cfg = load_config(None, [*BASE, "engine.precision=bf16"])
    net = small_net()
    reference = small_net()
    engine = DDPTrainEngine(cfg, net, net.parameters(), 0.1, 10, on_gpu=False)
    x = torch.randn(4, 3, 8, 8)
    out = engine.forward(x)
    assert out.dtype == torch.bfloat16  # the forward ran in bf16
    engine.backward(out.float().square().mean())
    assert engine.end_micro_batch()
    # the optimiser updated fp32 weights; BatchNorm's weights and statistics stay fp32
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(b.dtype == torch.float32 for n, b in net.named_buffers() if "running" in n)
    assert not torch.equal(net[0].weight, reference[0].weight)
    # the update is the bf16 forward's gradient applied in fp32: close to the fp32 one
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out = reference(x)
    ref_out.float().square().mean().backward()
    expected = reference[0].weight - 0.1 * reference[0].weight.grad
    assert torch.allclose(net[0].weight, expected, atol=1e-6)


@pytest.fixture
def one_rank_group(tmp_path, monkeypatch):
    """A gloo process group of one rank and LOCAL_RANK, as Ray Train makes them (DeepSpeed
    needs both)."""
    import torch.distributed as dist

    monkeypatch.setenv("LOCAL_RANK", "0")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def autocast_query_answers_for_the_cpu(monkeypatch):
    """The GPU's situation on the CPU: on CUDA the no-argument torch.is_autocast_enabled()
    answers for the GPU, the device the engine runs on; on CPU it answers for CUDA (False
    here), so DeepSpeed's nested-autocast branch is never taken. Make it answer for the CPU."""
    query = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled",
                        lambda *device: query(*device) if device else query("cpu"))


@pytest.mark.parametrize("engine_name", ["deepspeed", "ddp"])
def test_bf16_forward_is_bf16_where_the_autocast_query_answers_for_the_device(
        engine_name, one_rank_group, autocast_query_answers_for_the_cpu):
    cfg = load_config(None, [*BASE, f"engine.engine={engine_name}", "engine.precision=bf16",
                             "engine.zero_stage=1"])
    net = small_net()
    cls = DeepSpeedTrainEngine if engine_name == "deepspeed" else DDPTrainEngine
    engine = cls(cfg, net, net.parameters(), 0.1, 10, on_gpu=False)
    out = engine.forward(torch.randn(4, 3, 8, 8))
    assert out.dtype == torch.bfloat16  # observed, not the config's word
    engine.backward(out.float().square().mean())
    assert engine.end_micro_batch()
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    if engine_name == "deepspeed":
        # every gradient reduced in fp32: no module marked as safe to reduce in bf16
        assert not any(hasattr(p, "comm_dtype") for p in engine.module.parameters())
    # the same context for the teacher's forward
    with torch.no_grad(), engine.autocast():
        assert small_net()(torch.randn(2, 3, 8, 8)).dtype == torch.bfloat16


def test_gpus_per_worker_above_one_is_refused_before_ray_starts():
    from icd_dist.config import ConfigError

    with pytest.raises(ConfigError, match=r"engine.gpus_per_worker.*\(0, 1\]"):
        load_config(None, ["engine.gpus_per_worker=2"])
    assert load_config(None, ["engine.gpus_per_worker=0.5"]).engine.gpus_per_worker == 0.5


def test_deepspeed_accelerator_only_cpu_where_no_worker_gets_a_gpu(monkeypatch):
    from icd_dist.train.ray_session import job_env

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    auto = load_config(None, [])
    assert "DS_ACCELERATOR" not in job_env(auto, None, None)  # local instance with GPUs
    assert "DS_ACCELERATOR" not in job_env(auto, "10.0.0.1:6379", None)  # not known yet
    assert job_env(load_config(None, ["engine.device=cpu"]), None, None)["DS_ACCELERATOR"] \
        == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine
    assert job_env(auto, None, None)["DS_ACCELERATOR"] == "cpu"


def test_skipped_fp16_step_does_not_advance_the_schedule():
    cfg = load_config(None, [*BASE, "engine.precision=bf16"])
    net = small_net()
    engine = DDPTrainEngine(cfg, net, net.parameters(), 0.1, 10, on_gpu=False)
    # fp16's dynamic loss scaling, on CPU: an overflowing step is skipped
    engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x = torch.randn(4, 3, 8, 8)
    before = [p.detach().clone() for p in net.parameters()]
    engine.backward(engine.forward(x).float().mean() * float("inf"))
    assert engine.end_micro_batch() is False  # not applied
    assert engine.scheduler.last_epoch == 0 and engine.lr() == pytest.approx(0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    engine.backward(engine.forward(x).float().mean())
    assert engine.end_micro_batch() is True
    assert engine.scheduler.last_epoch == 1 and engine.lr() == pytest.approx(0.1 * 0.9 ** 0.9)


def test_budget_counts_applied_steps():
    cfg = load_config(None, ["optim.batch_size=8", "engine.num_workers=2",
                             "engine.micro_batch_size=2", "optim.iterations=5"])
    b = StepBudget.of(cfg, 0, 40)  # 5 optimiser steps per epoch of 10 micro-batches
    assert (b.batches_per_epoch, b.epochs, b.iterations) == (10, 1, 5)

"""What bf16 and fp16 mean in the engines (no Ray): bf16 is autocast over fp32 weights on CPU
too, with the optimiser updating the fp32 weights and normalisation layers keeping fp32
weights and statistics; an optimiser step skipped by fp16 loss scaling does not advance the
poly schedule."""

import pytest
import torch
from torch import nn

from icd_dist.config import load_config
from icd_dist.train.engine import DDPTrainEngine, resolve_precision
from icd_dist.train.step_worker import StepBudget, TrainState, rng_states, set_rng_states

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
    assert engine.step()
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


def test_skipped_fp16_step_does_not_advance_the_schedule():
    cfg = load_config(None, [*BASE, "engine.precision=bf16"])
    net = small_net()
    engine = DDPTrainEngine(cfg, net, net.parameters(), 0.1, 10, on_gpu=False)
    # fp16's dynamic loss scaling, on CPU: an overflowing step is skipped
    engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x = torch.randn(4, 3, 8, 8)
    before = [p.detach().clone() for p in net.parameters()]
    engine.backward(engine.forward(x).float().mean() * float("inf"))
    assert engine.step() is False  # not applied
    assert engine.scheduler.last_epoch == 0 and engine.lr() == pytest.approx(0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    engine.backward(engine.forward(x).float().mean())
    assert engine.step() is True
    assert engine.scheduler.last_epoch == 1 and engine.lr() == pytest.approx(0.1 * 0.9 ** 0.9)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    torch.save({"rng": rng_states(), "state": TrainState(5, 10, [1.0], {("a", "b"): "bad"},
                                                         2, 1.5).to_saved()},
               tmp_path / "rank_0.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    saved = torch.load(tmp_path / "rank_0.pt", weights_only=True)
    set_rng_states(saved["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    state = TrainState.from_saved(saved["state"])
    assert state == TrainState(5, 10, [1.0], {("a", "b"): "bad"}, 2, 1.5)


def test_budget_counts_applied_steps():
    cfg = load_config(None, ["optim.batch_size=8", "engine.num_workers=2",
                             "engine.micro_batch_size=2", "optim.iterations=5"])
    b = StepBudget.of(cfg, 0, 40)  # 5 optimiser steps per epoch of 10 micro-batches
    assert (b.batches_per_epoch, b.epochs, b.iterations) == (10, 1, 5)

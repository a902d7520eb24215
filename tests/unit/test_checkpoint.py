"""Epoch checkpoints (train/checkpoint.py): the files' life cycle, the RNG states, and a
save/restore round trip through a real engine that continues exactly where it stopped."""

import random

import numpy as np
import pytest
import torch

from icd_dist.config import load_config
from icd_dist.train.checkpoint import EpochCheckpoints, TrainState, rng_states, set_rng_states
from icd_dist.train.engine import build_engine
from icd_dist.train.run_folder import RunFolder


def test_epoch_checkpoints_written_committed_read_and_pruned(tmp_path):
    run = RunFolder(str(tmp_path / "run"))
    ckpt = EpochCheckpoints(run, 1)
    assert ckpt.latest() is None
    for epoch in (0, 1):
        ckpt.write_files(epoch, lambda folder, e=epoch: (folder / "rank_0.pt").write_text(
            str(e)))
        assert ckpt.latest() == (epoch - 1 if epoch else None)  # not yet committed
        ckpt.commit(epoch)
        assert ckpt.latest() == epoch
    # the previous epoch's checkpoint is dropped once the next one is complete
    assert not (tmp_path / "run" / "step_1" / "checkpoints" / "epoch_0").exists()
    seen = []
    ckpt.read_files(1, lambda folder: seen.append((folder / "rank_0.pt").read_text()))
    assert seen == ["1"]
    assert not ckpt.prune()  # unfinished: a re-run resumes from it
    run.mark_done(1)
    assert ckpt.prune() and ckpt.latest() is None
    assert run.size_bytes() == len(b"done\n")


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
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
    assert saved["state"]["iteration"] == 5 and "global_step" not in saved["state"]
    # a checkpoint from before the iteration/step naming resumes at its iteration
    legacy = {("global_step" if k == "iteration" else k): v for k, v in saved["state"].items()}
    assert TrainState.from_saved(legacy) == state


def test_a_ddp_engine_checkpoint_of_the_old_naming_restores_its_micro_batch(tmp_path):
    engine = _engine(0)
    engine.backward(engine.forward(torch.ones(2, 4)).sum())
    assert engine.end_micro_batch()
    engine.save(tmp_path)
    saved = torch.load(tmp_path / "ddp_engine.pt", weights_only=True)
    assert saved["micro_batch"] == 1
    saved["micro_step"] = saved.pop("micro_batch")  # as written before the naming
    torch.save(saved, tmp_path / "ddp_engine.pt")
    restored = _engine(1)
    restored.load(tmp_path)
    assert restored.micro_batch == 1


def _engine(seed: int):
    cfg = load_config(None, ["engine.engine=ddp", "optim.optimizer=sgd", "optim.lr=0.1",
                             "optim.batch_size=2", "engine.num_workers=1"])
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5),
                              torch.nn.Linear(8, 1))
    return build_engine(cfg, net, [p for p in net.parameters()], 0.1, 10, on_gpu=False)


def _train(engine, state: TrainState, iterations: int) -> None:
    for _ in range(iterations):  # data and dropout both draw from the global RNG
        x = torch.randn(2, 4)
        loss = engine.forward(x).pow(2).mean()
        engine.backward(loss)
        assert engine.end_micro_batch()
        state.iteration += 1
        state.loss_curve.append(float(loss.detach()))


@pytest.mark.parametrize("stop_after", [1, 3])
def test_restored_checkpoint_continues_bit_identical(tmp_path, stop_after):
    """Train 5 iterations straight; or train `stop_after`, save, scramble every RNG and the
    weights, restore into a fresh engine and train the rest: the same weights, lr and loss
    curve, bit for bit."""
    torch.manual_seed(7)
    straight, s_state = _engine(0), TrainState()
    _train(straight, s_state, 5)

    torch.manual_seed(7)
    first, state = _engine(0), TrainState()
    _train(first, state, stop_after)
    ckpt = EpochCheckpoints(RunFolder(str(tmp_path / "run")), 0)
    ckpt.save(stop_after - 1, first, state, rank=0, world=1)
    assert ckpt.latest() == stop_after - 1

    torch.manual_seed(123)  # another process: other RNG states, other initial weights
    np.random.seed(123)
    second = _engine(1)
    restored = ckpt.restore(second, rank=0)
    assert restored is not None and restored.epoch == stop_after - 1
    assert restored.state == state
    set_rng_states(restored.rng)
    _train(second, restored.state, 5 - stop_after)

    assert restored.state.loss_curve == s_state.loss_curve
    assert second.lr() == straight.lr()
    for a, b in zip(straight.module.parameters(), second.module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_restore_names_the_missing_rank(tmp_path):
    ckpt = EpochCheckpoints(RunFolder(str(tmp_path / "run")), 2)
    engine, state = _engine(0), TrainState()
    ckpt.save(0, engine, state, rank=0, world=1)
    with pytest.raises(RuntimeError, match="no state for rank 1.*engine.num_workers"):
        ckpt.restore(_engine(0), rank=1)

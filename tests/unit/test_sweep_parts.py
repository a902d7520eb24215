"""The parts of the Tune sweep that need no cluster: the step-0 key, the search space, the
parameter overrides, the per-schedule ASHA routing."""

import pytest

from icd_dist.config import ConfigError, load_config, update
from icd_dist.css import get_task
from icd_dist.css.classes import generic_spec
from icd_dist.train.step0 import step0_identity, step0_key
from icd_dist.train.sweep import PerScheduleASHA

SPEC = generic_spec("synthetic", 5)
KEYS = [f"s{i}" for i in range(10)]


def key_of(cfg, task_name, keys=KEYS):
    task = get_task(SPEC, task_name, "overlap")
    return step0_key(step0_identity(cfg, task, keys))


def test_step0_key_is_shared_exactly_where_step0_is_the_same():
    cfg = load_config("configs/tune/demo.yaml")
    assert key_of(cfg, "2-1") == key_of(cfg, "2-2")  # same step-0 classes
    assert key_of(cfg, "2-1") != key_of(cfg, "3-1")  # other step-0 classes
    # Distillation weights and incremental optimisation do not shape step 0 ...
    for change in ({"loss.icd.lambda_int": 7.0}, {"loss.lambda_kd": 0.0},
                   {"optim.lr_incremental": 0.1}, {"optim.epochs_incremental": 1},
                   {"method.name": "mib"}, {"method.name": "plop"},
                   {"model.taps": "pre_activation"}, {"model.mib_init": True}):
        assert key_of(update(cfg, change), "2-1") == key_of(cfg, "2-1"), change
    # ... everything that trains step 0 does.
    for change in ({"optim.lr": 0.1}, {"optim.epochs": 3}, {"run.seed": 1},
                   {"model.head_channels": 16}, {"data.crop_size": 32},
                   {"data.crop_mode": "padded"},
                   {"engine.launcher": "ray", "engine.num_workers": 2},
                   {"model.head": "deeplabv3"}):
        assert key_of(update(cfg, change), "2-1") != key_of(cfg, "2-1"), change
    # where the steps train does not change what they train (the in-process launcher gives
    # one Ray worker's weights)
    assert key_of(update(cfg, {"engine.launcher": "ray"}), "2-1") == key_of(cfg, "2-1")
    # auto is the head it resolves to (MiB's with the standard classifier)
    assert key_of(update(cfg, {"model.head": "mib"}), "2-1") == key_of(cfg, "2-1")
    assert key_of(cfg, "2-1", KEYS[:-1]) != key_of(cfg, "2-1")  # another image set


def test_step0_model_config_names_the_head_a_model_was_trained_with():
    from icd_dist.train.step0 import step0_model_config

    assert step0_model_config({"backbone": "resnet18", "head": "auto"})["head"] == "mib"
    assert step0_model_config({"head": "auto", "classifier": "dkd"})["head"] == "deeplabv3"
    # a config.yaml written before model.head existed: its model had DKD's/torchvision's head
    assert step0_model_config({"backbone": "resnet18"})["head"] == "deeplabv3"


def test_step0_key_changes_with_the_step0_training_code(monkeypatch):
    import icd_dist.train.step0 as cache

    cfg = load_config("configs/tune/demo.yaml")
    before = key_of(cfg, "2-1")
    monkeypatch.setattr(cache, "STEP0_PROTOCOL", cache.STEP0_PROTOCOL + 1)
    assert key_of(cfg, "2-1") != before


class FakeTrial:
    def __init__(self, trial_id, schedule):
        self.trial_id, self.config = trial_id, {"schedule": schedule}


def test_per_schedule_asha_compares_only_within_a_schedule():
    from ray.tune.schedulers import TrialScheduler

    sched = PerScheduleASHA({"6-1": 5, "6-5": 1}, grace_period=1, reduction_factor=2)
    good, bad, other = FakeTrial("a", "6-1"), FakeTrial("b", "6-1"), FakeTrial("c", "6-5")
    for t in (good, bad, other):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, good, {"step": 1, "score": 0.6}) == TrialScheduler.CONTINUE
    # A 6-5 trial with a low score is not judged against 6-1's numbers.
    assert sched.on_trial_result(None, other, {"step": 1, "score": 0.1}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, bad, {"step": 1, "score": 0.2}) == TrialScheduler.STOP


def test_trial_concurrency_fits_the_cluster_and_refuses_a_trial_that_cannot_fit():
    from icd_dist.train.sweep import trial_concurrency

    cfg = load_config("configs/tune/demo.yaml", ["engine.cpus_per_worker=0.9"])
    two_cores = {"CPU": 2.0}
    assert trial_concurrency(cfg, False, two_cores, fixed_size=True) == 2  # 0.95 CPU each
    assert trial_concurrency(update(cfg, {"tune.max_concurrent": 3}), False, two_cores,
                             fixed_size=True) == 3
    assert trial_concurrency(cfg, True, {"CPU": 16, "GPU": 16}, fixed_size=False) == 16
    # Two 1-CPU workers + the driver's sliver need 2.05 CPUs: on 2 cores the trial's
    # TorchTrainer would wait forever, so it is an error naming the keys to change.
    too_big = update(cfg, {"engine.launcher": "ray", "engine.num_workers": 2,
                           "engine.cpus_per_worker": 1.0})
    with pytest.raises(ConfigError, match="one trial needs 2.05 CPUs"):
        trial_concurrency(too_big, False, two_cores, fixed_size=True)
    # A cluster that can grow (an autoscaler) is trusted to add the CPUs.
    assert trial_concurrency(too_big, False, two_cores, fixed_size=False) == 1


def test_a_trial_reserves_its_workers_resources_when_it_trains_in_process():
    from icd_dist.train.sweep import trial_resources

    cfg = load_config("configs/tune/demo.yaml", ["engine.cpus_per_worker=0.9",
                                                 "engine.gpus_per_worker=1"])
    assert cfg.engine.launcher == "local"  # the demo's trials train in their own process
    assert trial_resources(cfg, gpu=False) == {"cpu": pytest.approx(0.95)}
    assert trial_resources(cfg, gpu=True) == {"cpu": pytest.approx(0.95), "gpu": 1}
    # a TorchTrainer's driver: its workers reserve their own
    assert trial_resources(update(cfg, {"engine.launcher": "ray"}), gpu=True) == {"cpu": 0.05}


def test_sweep_table_shows_each_trials_old_new_and_hiou_at_its_last_step():
    from icd_dist.train.sweep import format_sweep_table

    def steps(*rows):
        return [dict(zip(("step", "miou_old", "miou_new", "miou_all", "hiou"), r, strict=True))
                for r in rows]

    summary = {
        "metric": "all",
        "trials": [
            {"trial_id": "abc_00000", "schedule": "3-1", "params": {"lambda_ext": 3.5},
             "status": "finished", "last_step": 2, "score": 0.6,
             "steps": steps((1, 0.8, 0.4, 0.7, 0.5), (2, 0.7, 0.5, 0.6, 0.5833))},
            {"trial_id": "abc_00001", "schedule": "3-1", "params": {"lambda_ext": 70.0},
             "status": "stopped", "last_step": 1, "score": None,
             "steps": steps((1, 0.75, 0.012, 0.55, 0.0236))},
            {"trial_id": "abc_00002", "schedule": "3-1", "params": {"lambda_ext": 9.0},
             "status": "error", "last_step": -1, "score": None, "steps": []},
        ],
        "step0": {"keys": {"k": {}}, "trainings_run": 1, "reused": 2},
        "best_per_schedule": {"3-1": {"score": 0.6, "params": {"lambda_ext": 3.5}}},
        "best_overall": None, "best_configs": {},
    }
    lines = format_sweep_table(summary).splitlines()
    assert lines[0].split() == ["trial", "schedule", "lambda_ext", "status", "step", "old",
                                "new", "hIoU", "score"]
    # the last step's numbers, not the first's
    assert lines[2].split() == ["abc_00000", "3-1", "3.5", "finished", "2", "70.00", "50.00",
                                "58.33", "60.00"]
    assert lines[3].split() == ["abc_00001", "3-1", "70", "stopped", "1", "75.00", "1.20",
                                "2.36", "-"]
    assert lines[4].split() == ["abc_00002", "3-1", "9", "error", "-1", "-", "-", "-", "-"]
    assert any(line.startswith("score: all-class mIoU after") for line in lines)

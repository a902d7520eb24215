"""The table arithmetic of tools/css_benchmark.py: the joint row's old/new split, the mean
and spread over seeds, and the job plan (every continual run from its seed's step 0)."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location("css_benchmark", TOOLS / "css_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["css_benchmark"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["css_benchmark"]
    sys.path.remove(str(TOOLS))


def job(bench, kind, label, task, seed, last, steps=2):
    j = bench.Job(f"{task}-{label}-s{seed}", kind, label, task, seed, "c.yaml", ["a=1"])
    j.wall_s = 120.0
    j.summary = {"steps": [{"step": s, "seconds": 10.0 * (s + 1), **(last if s == steps - 1
                                                                       else {})}
                           for s in range(steps)]}
    return j


def test_joint_scores_split_its_classes_as_the_continual_tasks(bench):
    iou = {"sky": 0.9, "road": 0.7, "car": 0.4, "bicyclist": 0.0, "background": None}
    joint = job(bench, "joint", "joint", "offline", 0,
                {"per_class_iou": iou, "miou_all": 0.5, "miou_old": 0.5, "miou_new": None,
                 "hiou": None}, steps=1)
    s = bench.scores(joint, ["background", "sky", "road"])
    assert s["old"] == pytest.approx(80.0) and s["new"] == pytest.approx(20.0)
    assert s["all"] == pytest.approx(50.0) and s["hiou"] == pytest.approx(32.0)
    assert bench.trained_seconds(joint) == pytest.approx(10.0)


def test_rows_average_over_seeds_with_population_spread(bench):
    jobs = [job(bench, "method", "mib", "6-1", seed,
                {"miou_old": old, "miou_new": 0.1, "miou_all": 0.4, "hiou": None})
            for seed, old in ((0, 0.6), (1, 0.8))]
    (row,) = bench.aggregate(jobs, ["background"])
    assert row["seeds"] == [0, 1]
    assert row["old"] == pytest.approx(70.0) and row["old_std"] == pytest.approx(10.0)
    assert row["new"] == pytest.approx(10.0) and row["new_std"] == pytest.approx(0.0)
    assert row["hiou"] is None and row["wall_min"] == pytest.approx(2.0)
    assert row["train_s"] == pytest.approx(20.0)  # the shared step 0 is not this run's
    assert bench._cell(row, "old") == "70.0 ± 10.0"
    single = bench.aggregate(jobs[:1], ["background"])[0]
    assert single["old_std"] is None and bench._cell(single, "old") == "60.0"


def test_plan_runs_every_continual_schedule_from_its_seeds_step0(bench, tmp_path):
    args = argparse.Namespace(seeds=[0, 3], smoke=False, tasks=["6-5", "6-1"],
                              methods=["ft", "mib", "plop", "icd"], ablation_task="6-1")
    jobs = bench.plan(args, tmp_path / "t", tmp_path / "v", tmp_path / "runs")
    per_seed = 1 + 1 + 2 * 4 + len(bench.ABLATION)
    assert len(jobs) == 2 * per_seed and len({j.key for j in jobs}) == len(jobs)
    assert [j.kind for j in jobs[:4]] == ["step0", "step0", "joint", "joint"]
    for j in jobs:
        assert f"run.seed={j.seed}" in j.overrides and f"run.name={j.key}" in j.overrides
        if j.kind in ("method", "ablation"):
            assert j.needs == f"step0-s{j.seed}"
            assert j.extra_args == ["--step0-from", str(tmp_path / "runs" / j.needs)]
    ablation = [j for j in jobs if j.kind == "ablation" and j.seed == 0]
    assert all(j.task == "6-1" and j.config.endswith("6-1_icd.yaml") for j in ablation)
    assert {o for j in ablation for o in j.overrides} >= {"loss.icd.msca=learned",
                                                          "loss.icd.lambda_ext=0",
                                                          "loss.icd.lambda_int=0"}


def test_plan_trains_dkds_own_step0_for_its_rows(bench, tmp_path):
    args = argparse.Namespace(seeds=[0], smoke=False, tasks=["6-5", "6-1"],
                              methods=["mib", "dkd"], ablation_task=None)
    jobs = {j.key: j for j in bench.plan(args, tmp_path / "t", tmp_path / "v", tmp_path / "r")}
    assert set(jobs) == {"step0-s0", "step0-dkd-s0", "joint-s0", "6-5-mib-s0", "6-1-mib-s0",
                         "6-5-dkd-s0", "6-1-dkd-s0"}
    own = jobs["step0-dkd-s0"]
    assert own.kind == "step0" and own.config == "configs/camvid/6-5_dkd.yaml"
    assert own.extra_args == ["--last-step", "0"]
    for task in ("6-5", "6-1"):
        assert jobs[f"{task}-dkd-s0"].needs == "step0-dkd-s0"
        assert jobs[f"{task}-dkd-s0"].config == f"configs/camvid/{task}_dkd.yaml"
        assert jobs[f"{task}-mib-s0"].needs == "step0-s0"
    # DKD alone, without joint: no CE step 0 to train
    args = argparse.Namespace(seeds=[0], smoke=False, tasks=["6-5"], methods=["dkd"],
                              ablation_task=None, joint=False)
    assert [j.key for j in bench.plan(args, tmp_path / "t", tmp_path / "v", tmp_path / "r")] \
        == ["step0-dkd-s0", "6-5-dkd-s0"]

"""The arithmetic of tools/css_benchmark.py, against hand-derived values: the joint row's
old/new split, the mean and spread over seeds on both eval sets, the paired differences and
their reading (an ordering only with one sign on every seed and a mean beyond the spread),
where val and the held-out drive disagree, the targets, the held-out split, and the job plan
(every continual run from its family's step 0 of its seed, each run evaluated on the
held-out drive)."""

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


def job(bench, kind, label, task, seed, last, steps=2, heldout=None, family="large"):
    j = bench.Job(f"{task}-{label}-s{seed}", kind, label, task, seed, "c.yaml", ["a=1"],
                  family=family)
    j.wall_s = 120.0
    j.summary = {"steps": [{"step": s, "seconds": 10.0 * (s + 1), **(last if s == steps - 1
                                                                       else {})}
                           for s in range(steps)]}
    j.heldout = heldout
    return j


def metrics(old, new, all_, hiou=None, iou=None):
    return {"miou_old": old, "miou_new": new, "miou_all": all_, "hiou": hiou,
            "per_class_iou": iou or {"background": old, "car": new}}


def test_joint_scores_split_its_classes_as_the_continual_tasks(bench):
    iou = {"sky": 0.9, "road": 0.7, "car": 0.4, "bicyclist": 0.0, "background": None}
    joint = job(bench, "joint", "joint", "joint-large", 0,
                {"per_class_iou": iou, "miou_all": 0.5, "miou_old": 0.5, "miou_new": None,
                 "hiou": None}, steps=1,
                heldout={"per_class_iou": {"sky": 0.5, "road": 0.3, "car": 0.1,
                                           "bicyclist": 0.3}, "miou_all": 0.3})
    s = bench.scores(joint, ["background", "sky", "road"])
    assert s["old"] == pytest.approx(80.0) and s["new"] == pytest.approx(20.0)
    assert s["all"] == pytest.approx(50.0) and s["hiou"] == pytest.approx(32.0)
    h = bench.scores(joint, ["background", "sky", "road"], "heldout")
    assert h["old"] == pytest.approx(40.0) and h["new"] == pytest.approx(20.0)
    assert h["hiou"] == pytest.approx(2 * 40 * 20 / 60)
    assert bench.trained_seconds(joint) == pytest.approx(10.0)


def test_rows_average_over_seeds_with_population_spread_on_both_eval_sets(bench):
    jobs = [job(bench, "method", "mib", "large-4s", seed, metrics(old, 0.1, 0.4),
                heldout=metrics(old / 2, 0.3, 0.2))
            for seed, old in ((1, 0.8), (0, 0.6))]
    (row,) = bench.aggregate(jobs, {"large": ["background"]})
    assert row["seeds"] == [0, 1]  # sorted by seed, per_seed in the same order
    val, held = row["val"], row["heldout"]
    assert [s["old"] for s in val["per_seed"]] == pytest.approx([60.0, 80.0])
    assert val["old"] == pytest.approx(70.0) and val["old_std"] == pytest.approx(10.0)
    assert val["new"] == pytest.approx(10.0) and val["new_std"] == pytest.approx(0.0)
    assert held["old"] == pytest.approx(35.0) and held["old_std"] == pytest.approx(5.0)
    assert val["hiou"] is None and row["wall_min"] == pytest.approx(2.0)
    assert val["per_class"]["background"] == pytest.approx({"mean": 70.0, "std": 10.0})
    assert row["train_s"] == pytest.approx(20.0)  # the shared step 0 is not this run's
    assert bench._cell(val, "old") == "70.0 ± 10.0"
    single = bench.aggregate(jobs[:1], {"large": ["background"]})[0]
    assert single["val"]["old_std"] is None and bench._cell(single["val"], "old") == "80.0"
    # a row without held-out metrics has none (not zeros)
    jobs[0].heldout = None
    assert bench.aggregate(jobs, {"large": ["background"]})[0]["heldout"] is None


def test_verdict_needs_one_sign_on_every_seed_and_a_mean_beyond_the_spread(bench):
    assert bench.verdict([2.0, 3.0, 4.0], 1.5) == "higher"
    assert bench.verdict([-2.0, -3.0, -4.0], 1.5) == "lower"
    assert bench.verdict([2.0, 3.0, 4.0], 3.0) == "not settled"      # mean 3 not beyond 3
    assert bench.verdict([5.0, 6.0, -0.5], 0.1) == "not settled"     # one seed the other way
    assert bench.verdict([0.0, 2.0, 2.0], 0.1) == "not settled"      # a tie is no sign
    assert bench.verdict([4.0], None) == "not settled (one seed)"


def test_paired_differences_align_seeds_and_take_the_larger_spread(bench):
    icd = job(bench, "method", "icd", "large-2s", 0, metrics(0.7, 0.4, 0.6))
    rows_jobs = [icd, job(bench, "method", "icd", "large-2s", 1, metrics(0.9, 0.4, 0.7)),
                 job(bench, "method", "mib", "large-2s", 1, metrics(0.5, 0.2, 0.4)),
                 job(bench, "method", "mib", "large-2s", 0, metrics(0.6, 0.2, 0.45))]
    rows = bench.aggregate(rows_jobs, {"large": ["background"]})
    by = {r["label"]: r for r in rows}
    p = bench.paired(by["icd"], by["mib"], "val", "old")
    # seed 0: 70 - 60, seed 1: 90 - 50; spreads: icd 10, mib 5 -> 10
    assert p["seeds"] == [0, 1] and p["diffs"] == pytest.approx([10.0, 40.0])
    assert p["mean"] == pytest.approx(25.0) and p["spread"] == pytest.approx(10.0)
    assert p["verdict"] == "higher"
    assert bench.paired(by["icd"], by["mib"], "heldout", "old") is None  # no held-out here
    pairs = bench.comparisons(rows, None)
    assert {(q["a"], q["b"], q["metric"]) for q in pairs} == {
        ("icd", "mib", m) for m in ("old", "new", "all")}  # hIoU: None on every seed
    new = next(q for q in pairs if q["metric"] == "new")
    assert new["diffs"] == pytest.approx([20.0, 20.0]) and new["spread"] == pytest.approx(0.0)
    assert new["verdict"] == "higher"


def test_disagreements_name_the_comparisons_whose_reading_differs(bench):
    base = {"task": "large-2s", "a": "icd", "b": "mib"}
    pairs = [{**base, "metric": "all", "eval_set": "val", "verdict": "higher"},
             {**base, "metric": "all", "eval_set": "heldout", "verdict": "not settled"},
             {**base, "metric": "old", "eval_set": "val", "verdict": "lower"},
             {**base, "metric": "old", "eval_set": "heldout", "verdict": "lower"}]
    assert bench.disagreements(pairs) == [{**base, "metric": "all", "val": "higher",
                                           "heldout": "not settled"}]


def test_targets_read_joint_step0_and_ft_of_the_task_family(bench):
    jobs = [job(bench, "joint", "joint", "joint-large", 0,
                metrics(0.9, None, 0.8, iou={"background": 0.9, "car": 0.3}), steps=1),
            job(bench, "step0", "step 0 (shared)", "step0-large", 0, metrics(0.55, None, 0.55),
                steps=1),
            job(bench, "method", "ft", "large-2s", 0, metrics(0.05, 0.5, 0.3))]
    rows = bench.aggregate(jobs, {"large": ["background"]})
    got = {t["target"]: (t["value"], t["met"]) for t in bench.check_targets(rows, "large-2s")}
    assert got["joint new-class mIoU >= 25"] == (pytest.approx(30.0), True)
    assert got["step-0 mIoU on its classes >= 60"] == (pytest.approx(55.0), False)
    assert got["ft old-class mIoU (it must forget) <= 10"] == (pytest.approx(5.0), True)


def test_heldout_drive_is_out_of_training(bench, tmp_path):
    (tmp_path / "train.txt").write_text(
        "train/0001TP_1.jpg trainannot/0001TP_1.png\ntrain/0006R0_1.jpg trainannot/0006R0_1.png\n"
        "train/0016E5_1.jpg trainannot/0016E5_1.png\ntrain/0006R0_2.jpg trainannot/0006R0_2.png\n")
    (tmp_path / "val.txt").write_text("val/0016E5_9.jpg valannot/0016E5_9.png\n")
    sets = bench.split_lists(tmp_path, smoke=False)
    assert [ln.split()[0] for ln in sets["train"]] == ["train/0001TP_1.jpg",
                                                       "train/0016E5_1.jpg"]
    assert [ln.split()[0] for ln in sets["heldout"]] == ["train/0006R0_1.jpg",
                                                         "train/0006R0_2.jpg"]
    assert len(sets["val"]) == 1


def run_key(bench, task, method, seed):
    """A method run's key as plan names it: plain for ft and the natural-order tasks, with the
    shipped file's tag where the tuning study changed it (run_tag)."""
    config = bench.method_config(task, method, False)
    return f"{task}-{method}-{bench.run_tag(task, method, config, [])}s{seed}"


def _args(**kw):
    base = {"seeds": [0], "smoke": False, "tasks": ["large-2s"], "methods": ["mib"],
            "ablation_task": None, "joint": True, "launcher": "local"}
    return argparse.Namespace(**{**base, **kw})


def test_plan_runs_every_continual_schedule_from_its_family_step0(bench, tmp_path):
    shards = {"train": tmp_path / "t", "val": tmp_path / "v", "heldout": tmp_path / "h"}
    runs = tmp_path / "runs"
    args = _args(seeds=[0, 3], tasks=["large-2s", "large-4s", "6-5"],
                 methods=["ft", "mib", "plop", "icd"], ablation_task="large-2s")
    jobs = bench.plan(args, shards, runs)
    trained = [j for j in jobs if j.kind != "eval"]
    # per seed: 2 families x (step 0 + joint), 3 tasks x 4 methods, the ablation
    per_seed = 2 * 2 + 3 * 4 + len(bench.ABLATION)
    assert len(trained) == 2 * per_seed and len({j.key for j in jobs}) == len(jobs)
    # every run is evaluated on the held-out drive once, after it
    evals = {j.needs: j for j in jobs if j.kind == "eval"}
    assert set(evals) == {j.key for j in trained}
    mib = run_key(bench, "large-2s", "mib", 0)
    assert evals[mib].extra_args == [
        "--run", str(runs / mib), "--data", str(tmp_path / "h"), "--json"]
    assert evals[mib].command("py")[:3] == ["py", "-m", "icd_dist.evaluate"]
    assert [j.kind for j in trained[:4]] == ["step0"] * 4
    for j in trained:
        assert f"run.seed={j.seed}" in j.overrides and f"run.name={j.key}" in j.overrides
        assert f"data.train_shards={tmp_path / 't'}" in j.overrides
        assert "engine.launcher=local" in j.overrides  # one worker each: in-process
        if j.kind in ("method", "ablation"):
            fam = "natural" if j.task == "6-5" else "large"
            assert j.needs == f"step0-{fam}-s{j.seed}"
            assert j.extra_args == ["--step0-from", str(runs / j.needs)]
    step0 = {j.key: j for j in trained if j.kind == "step0"}
    assert step0["step0-large-s0"].config == "configs/camvid/large-2s_ft.yaml"
    assert step0["step0-natural-s0"].config == "configs/camvid/6-5_ft.yaml"
    joints = {j.key: j.config for j in trained if j.kind == "joint"}
    assert joints["joint-large-s3"] == "configs/camvid/large-joint_joint.yaml"
    assert joints["joint-natural-s3"] == "configs/camvid/joint.yaml"
    ablation = [j for j in trained if j.kind == "ablation" and j.seed == 0]
    assert all(j.task == "large-2s" and j.config.endswith("large-2s_icd.yaml")
               for j in ablation)
    assert {o for j in ablation for o in j.overrides} >= {"loss.icd.msca=learned",
                                                          "loss.icd.lambda_ext=0",
                                                          "loss.icd.lambda_int=0"}


def test_plan_trains_dkds_own_step0_for_its_rows(bench, tmp_path):
    shards = {"train": tmp_path / "t", "val": tmp_path / "v", "heldout": tmp_path / "h"}
    args = _args(tasks=["large-2s", "large-4s"], methods=["mib", "dkd"])
    jobs = {j.key: j for j in bench.plan(args, shards, tmp_path / "r") if j.kind != "eval"}
    key = {(t, m): run_key(bench, t, m, 0) for t in ("large-2s", "large-4s")
           for m in ("mib", "dkd")}
    assert set(jobs) == {"step0-large-s0", "step0-dkd-large-s0", "joint-large-s0",
                         *key.values()}
    own = jobs["step0-dkd-large-s0"]
    assert own.kind == "step0" and own.config == "configs/camvid/large-2s_dkd.yaml"
    assert own.extra_args == ["--last-step", "0"]
    for task in ("large-2s", "large-4s"):
        assert jobs[key[task, "dkd"]].needs == "step0-dkd-large-s0"
        assert jobs[key[task, "dkd"]].config == f"configs/camvid/{task}_dkd.yaml"
        assert jobs[key[task, "mib"]].needs == "step0-large-s0"
    # DKD alone, without joint: no CE step 0 to train
    args = _args(methods=["dkd"], joint=False)
    assert [j.key for j in bench.plan(args, shards, tmp_path / "r") if j.kind != "eval"] \
        == ["step0-dkd-large-s0", key["large-2s", "dkd"]]


def test_the_large_task_configs_hold_their_classes_and_protocol():
    from icd_dist.config import load_config

    configs = Path(__file__).resolve().parents[2] / "configs" / "camvid"
    for method in ("ft", "mib", "plop", "icd", "dkd"):
        two = load_config(str(configs / f"large-2s_{method}.yaml"))
        four = load_config(str(configs / f"large-4s_{method}.yaml"))
        assert two.method.name == four.method.name == method
        assert two.task.steps == ((0, 1, 2, 4), (5, 6, 9))
        assert four.task.steps == ((0, 1, 2, 4), (6,), (5,), (9,))
        assert two.data.eval_unseen == four.data.eval_unseen == "ignore"
        assert two.optim.iterations_incremental == 200
        assert four.optim.iterations_incremental == 100
        assert two.optim.optimizer == "adamw" and two.data.crop_size == 144
    joint = load_config(str(configs / "large-joint_joint.yaml"))
    assert joint.method.name == "joint" and joint.task.steps == ((0, 1, 2, 4, 5, 6, 9),)
    assert joint.optim.iterations == 800 and joint.data.eval_unseen == "ignore"


def test_every_planned_run_reuses_a_step0_of_its_own_step0_identity(bench, tmp_path):
    """The benchmark plans its step-0 jobs; --step0-from accepts each reuse only where the
    identities match (train/step0.py), so the plan must pair every run with a step 0 of its
    identity: every method, the ablation, both families, DKD's own step 0."""
    from icd_dist.config import load_config
    from icd_dist.css import task_from_config
    from icd_dist.train.step0 import identity_differences, step0_identity

    shards = {"train": tmp_path / "t", "val": tmp_path / "v", "heldout": tmp_path / "h"}
    args = _args(seeds=[0], tasks=list(bench.TASKS), methods=list(bench.METHODS),
                 ablation_task="large-2s")
    jobs = {j.key: j for j in bench.plan(args, shards, tmp_path / "r") if j.kind != "eval"}

    def identity(j):
        cfg = load_config(bench.ROOT / j.config, j.overrides)
        task = task_from_config(cfg)
        # the same images: the step-0 classes select them from one manifest
        return step0_identity(cfg, task, [f"img{c}" for c in task.classes_at(0)])

    reusing = [j for j in jobs.values() if j.needs]
    assert {j.kind for j in reusing} == {"method", "ablation"} and len(reusing) > 20
    for j in reusing:
        assert identity(j) == identity(jobs[j.needs]), (
            j.key, identity_differences(identity(j), identity(jobs[j.needs])))


def test_settings_pick_shipped_or_borrowed_configs_and_keep_their_runs_apart(bench, tmp_path,
                                                                          monkeypatch):
    import shutil

    root = Path(__file__).resolve().parents[2]
    shutil.copytree(root / "configs", tmp_path / "configs")
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    shipped = tmp_path / "configs/camvid/large-2s_mib.yaml"
    shipped.write_text((tmp_path / "configs/camvid/large-2s_mib_borrowed.yaml").read_text())
    shards = {"train": tmp_path / "t", "val": tmp_path / "v", "heldout": tmp_path / "h"}

    def keys(settings, tuned=None):
        jobs = bench.plan(_args(methods=["ft", "mib"], settings=settings), shards,
                          tmp_path / "r", tuned)
        return {(j.label, j.key, j.config) for j in jobs if j.kind == "method"}

    # shipped values equal to the borrowed ones: the plain keys, whichever file is read
    assert keys("shipped") == {("ft", "large-2s-ft-s0", "configs/camvid/large-2s_ft.yaml"),
                               ("mib", "large-2s-mib-s0", "configs/camvid/large-2s_mib.yaml")}
    assert keys("borrowed") == {
        ("ft", "large-2s-ft-s0", "configs/camvid/large-2s_ft.yaml"),
        ("mib", "large-2s-mib-s0", "configs/camvid/large-2s_mib_borrowed.yaml")}
    # the study's values in the shipped file: its runs and the borrowed ones never share a key
    shipped.write_text(shipped.read_text() + "loss: {lambda_kd: 3.0}\n")
    tag = bench.tuned_key([shipped.read_text()])
    assert ("mib", f"large-2s-mib-tuned-{tag}-s0", "configs/camvid/large-2s_mib.yaml") in \
        keys("shipped")
    assert ("mib", "large-2s-mib-borrowed-s0", "configs/camvid/large-2s_mib_borrowed.yaml") \
        in keys("borrowed")
    chosen = ["loss.lambda_kd=7.0"]
    assert ("mib", f"large-2s-mib-{bench.tuned_key(chosen)}-s0",
            "configs/camvid/large-2s_mib_borrowed.yaml") in keys("shipped", {"mib": chosen})

"""The logic of tools/css_tuned.py, the equal-budget tuning study, against hand-made sweeps:
the sweeps' order (one trains the shared step 0 before the others start), which trial is
chosen and in what order trials ran, where a value lies in its range (ICD's terms the search
turned down), that the chosen values reach the fresh runs' configs and name their folders,
and the readings' wording."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"


@pytest.fixture(scope="module")
def tuned():
    sys.path.insert(0, str(TOOLS))
    loaded = {}
    for name in ("css_benchmark", "css_tuned"):
        spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        loaded[name] = module
    yield loaded["css_tuned"]
    for name in loaded:
        del sys.modules[name]
    sys.path.remove(str(TOOLS))


def _shards(tmp_path):
    return {"train": tmp_path / "t", "val": tmp_path / "v", "heldout": tmp_path / "h"}


def test_sweeps_sharing_the_ce_step0_wait_for_the_first_and_dkd_starts_at_once(tuned, tmp_path):
    jobs = {j.label: j for j in tuned.sweep_jobs(["mib", "plop", "icd", "dkd"], 12,
                                                 _shards(tmp_path), tmp_path / "s", False)}
    assert jobs["mib"].needs is None and jobs["dkd"].needs is None
    assert jobs["plop"].needs == jobs["icd"].needs == "sweep-mib"
    cmd = jobs["icd"].command("py")
    assert cmd[:5] == ["py", "-m", "icd_dist.tune", "--config",
                       "configs/tune/camvid-large_icd.yaml"]
    # the sweeps never see the held-out drive: trained on train, judged on val
    assert f"data.train_shards={tmp_path / 't'}" in cmd and f"data.eval_shards={tmp_path / 'v'}" \
        in cmd and not any(str(tmp_path / "h") in c for c in cmd)
    assert "tune.num_samples=12" in cmd and f"run.storage_path={tmp_path / 's'}" in cmd
    # the order is the methods' first CE one, whichever it is
    later = {j.label: j.needs for j in tuned.sweep_jobs(["dkd", "icd", "mib"], 2,
                                                        _shards(tmp_path), tmp_path, True)}
    assert later == {"dkd": None, "icd": None, "mib": "sweep-icd"}


def test_every_study_sweep_has_the_same_protocol_and_starts_from_the_borrowed_values(tuned):
    from icd_dist.config import load_config
    from icd_dist.train.sweep import config_point, sweep_space

    protocols = set()
    for method in tuned.TUNED:
        cfg = load_config(ROOT / tuned.SWEEP_CONFIG.format(method=method))
        t = cfg.tune
        protocols.add((t.search, t.seed, t.num_samples, t.metric, t.scheduler, t.schedules,
                       t.try_config_first, cfg.run.seed, cfg.optim.iterations_incremental))
        borrowed = load_config(ROOT / f"configs/camvid/large-2s_{method}_borrowed.yaml")
        point = config_point(cfg, sweep_space(cfg))
        assert point == config_point(borrowed, sweep_space(cfg))
        assert tuned.sweep_name(method) == cfg.run.name
    assert protocols == {("optuna", 0, 12, "all", "none", ("large-2s",), True, 100, 200)}


def _sweep(folder, trials, space=None):
    folder.mkdir(parents=True)
    rows = []
    for trial_id, started, score, params in trials:
        (folder / "trials" / trial_id).mkdir(parents=True)
        (folder / "trials" / trial_id / "attempts.json").write_text(json.dumps([started]))
        rows.append({"trial_id": trial_id, "params": params, "score": score,
                     "status": "finished" if score is not None else "error",
                     "steps": [{"miou_old": 0.8, "miou_new": 0.2}] if score else []})
    (folder / "tune_summary.json").write_text(json.dumps(
        {"sweep": folder.name, "method": "icd", "trials": rows, "space": space or {}}))


def test_trials_in_start_order_and_the_best_chosen(tuned, tmp_path):
    _sweep(tmp_path / "sw", [("b", "2026-12-05T01:02:00", 0.50, {"x": 2}),
                             ("a", "2026-12-05T01:01:00", 0.40, {"x": 1}),
                             ("c", "2026-12-05T01:03:00", 0.50, {"x": 3}),
                             ("d", "2026-12-05T01:04:00", None, {"x": 4})])
    sweep = tuned.read_sweep(tmp_path / "sw")
    assert [(t["trial_id"], t["index"]) for t in sweep["trials"]] == [
        ("a", 1), ("b", 2), ("c", 3), ("d", 4)]
    # a tie goes to the earlier trial; a failed trial is never chosen
    assert tuned.choose(sweep) == {"index": 2, "trial_id": "b", "score": 0.50,
                                   "params": {"x": 2}}
    assert tuned.sweep_finished(sweep, 3) and not tuned.sweep_finished(sweep, 4)
    assert tuned.read_sweep(tmp_path / "none") is None
    assert not tuned.sweep_finished(None, 1)


def test_range_positions_on_log_and_linear_scales(tuned):
    space = {"w": {"loguniform": [0.01, 100.0]}, "u": {"uniform": [0.0, 4.0]},
             "c": {"choice": [0.5, 1.0]}}
    pos = tuned.range_positions(space, {"w": 0.1, "u": 1.0, "c": 0.5})
    assert pos == {"w": pytest.approx(0.25), "u": pytest.approx(0.25)}


def test_weights_at_the_bottom_are_turned_down_and_edges_flagged(tuned, tmp_path):
    space = {"loss.icd.lambda_int": {"loguniform": [0.01, 100.0]},
             "loss.icd.lambda_ext": {"loguniform": [0.1, 1000.0]},
             "optim.lr_incremental": {"loguniform": [5e-5, 5e-3]}}
    params = [{"loss.icd.lambda_int": v, "loss.icd.lambda_ext": e, "optim.lr_incremental": 5e-5}
              for v, e in ((0.012, 500.0), (30.0, 0.2), (0.05, 10.0), (1.0, 1.0))]
    _sweep(tmp_path / "sw", [(f"t{i}", f"2026-12-05T01:0{i}:00", s, p) for i, (s, p) in
                             enumerate(zip((0.7, 0.5, 0.6, 0.1), params, strict=True))], space)
    sweep = tuned.read_sweep(tmp_path / "sw")
    chosen = tuned.choose(sweep)
    downs = {d["key"]: d for d in tuned.weight_positions(sweep, chosen)}
    assert set(downs) == {"loss.icd.lambda_int", "loss.icd.lambda_ext", "optim.lr_incremental"}
    lint = downs["loss.icd.lambda_int"]
    assert lint["edge"] == "bottom" and lint["chosen"] == 0.012
    assert lint["position"] == pytest.approx(math.log(1.2) / math.log(1e4))
    # the best three trials: scores 0.7, 0.6, 0.5
    assert lint["top3_positions"] == pytest.approx(
        [math.log(1.2) / math.log(1e4), math.log(5) / math.log(1e4),
         math.log(3000) / math.log(1e4)])
    assert downs["loss.icd.lambda_ext"]["edge"] == "top"  # 500 of [0.1, 1000]: 0.92
    assert downs["optim.lr_incremental"]["edge"] == "bottom"
    # turned down: the weights at the bottom, not the learning rate
    assert tuned.turned_down(list(downs.values())) == ["loss.icd.lambda_int"]


def test_chosen_values_reach_the_fresh_runs_and_name_their_folders(tuned, tmp_path):
    import argparse

    from icd_dist.config import load_config

    params = {"loss.icd.lambda_int": 0.05, "loss.icd.stats": ["mean", "std", "max"],
              "loss.seg": "pseudo_ce", "optim.lr_incremental": 0.0012, "loss.icd.tau": 2.0}
    overrides = tuned.overrides_of(params)
    cfg = load_config(ROOT / "configs/camvid/large-4s_icd_borrowed.yaml", overrides)
    assert (cfg.loss.icd.lambda_int, cfg.loss.icd.stats, cfg.loss.seg,
            cfg.optim.lr_incremental, cfg.loss.icd.tau) == (
        0.05, ("mean", "std", "max"), "pseudo_ce", 0.0012, 2.0)
    args = argparse.Namespace(seeds=[0, 1], smoke=False, tasks=list(tuned.FRESH_TASKS),
                              methods=["ft", "icd"], ablation_task=None, joint=True,
                              launcher="local")
    jobs = {(j.label, j.task, j.seed): j for j in tuned.bench.plan(
        args, _shards(tmp_path), tmp_path / "r", {"icd": overrides}) if j.kind == "method"}
    icd = jobs[("icd", "large-4s", 1)]
    assert icd.config == "configs/camvid/large-4s_icd_borrowed.yaml"
    assert set(overrides) <= set(icd.overrides)
    tag = tuned.bench.tuned_key(overrides)
    assert icd.key == f"large-4s-icd-{tag}-s1" and f"run.name={icd.key}" in icd.overrides
    assert jobs[("ft", "large-4s", 1)].key == "large-4s-ft-s1"  # untuned: as the benchmark
    assert jobs[("ft", "large-4s", 1)].config == "configs/camvid/large-4s_ft.yaml"
    # other values, another folder; the same values in another order, the same one
    assert tuned.bench.tuned_key(tuned.overrides_of({**params, "loss.icd.tau": 0.5})) != tag
    assert tuned.bench.tuned_key(list(reversed(overrides))) == tag


def test_readings_say_above_below_or_not_separable(tuned):
    def pair(b, task, eval_set, verdict, diffs):
        return {"a": "icd", "b": b, "task": task, "eval_set": eval_set, "metric": "all",
                "kind": "method", "verdict": verdict, "diffs": diffs,
                "mean": sum(diffs) / len(diffs), "spread": 0.5}

    pairs = [pair("mib", "large-2s", "val", "lower", [-2.0, -1.0, -3.0]),
             pair("plop", "large-2s", "val", "higher", [2.0, 1.0, 3.0]),
             pair("mib", "large-4s", "heldout", "not settled", [2.0, -1.0, 3.0])]
    rows = [{"kind": "method", "task": "large-2s", "label": "dkd", "val": {"new": 12.5}}]
    chosen = {"icd": {"score": 0.61}, "mib": {"score": 0.65}}
    lines = tuned.answers(rows, pairs, chosen, ["loss.icd.lambda_int"])
    assert lines[0].endswith("best ICD trial 61.0, best MiB trial 65.0: no ICD configuration "
                             "beat tuned MiB.")
    assert lines.pop(1) == ("ICD's search turned down (chosen at the bottom of the range): "
                            "loss.icd.lambda_int")
    assert "large-2s, val (drive 0016E5): tuned ICD is below tuned MiB" in lines[1]
    assert "per seed -2.0, -1.0, -3.0" in lines[1]
    assert "tuned ICD is above tuned PLOP" in lines[2]
    assert "large-4s, held-out drive 0006R0: tuned ICD is not separable from tuned MiB" in \
        lines[3]
    assert lines[4] == ("Tuned DKD on large-2s: val new-class mIoU 12.5 (below 20: it does "
                        "not learn its new classes at this budget)")


def test_fresh_runs_come_in_the_order_the_readings_need(tuned, tmp_path):
    chosen = {"mib": {"params": {"loss.lambda_kd": 4.0}},
              "dkd": {"params": {"loss.dkd.pos_weight": 30.0}}}
    jobs = tuned.fresh_jobs(["mib", "dkd"], [0, 1], False, _shards(tmp_path), tmp_path / "r",
                            chosen)
    trained = [j for j in jobs if j.kind != "eval"]
    order = [(j.kind, j.label, j.task) for j in trained]
    stages = [{"step0"}, {("mib", "large-2s"), ("dkd", "large-2s")},
              {("mib", "large-4s"), ("dkd", "large-4s")}, {("ft", "large-2s"),
                                                            ("ft", "large-4s")}, {"joint"}]

    def stage(kind, label, task):
        key = kind if kind in ("step0", "joint") else (label, task)
        return next(i for i, s in enumerate(stages) if key in s)

    assert [stage(*o) for o in order] == sorted(stage(*o) for o in order)
    assert {stage(*o) for o in order} == set(range(5))
    assert len(trained) == 2 * (2 + 1 + 3 * 2)  # per seed: 2 step 0s, joint, 3 methods x 2
    assert all(j.kind == "eval" for j in jobs[:len(jobs) - len(trained)])
    # the chosen values on the borrowed config; ft as the benchmark runs it
    dkd = next(j for j in trained if j.label == "dkd" and j.task == "large-4s")
    assert "loss.dkd.pos_weight=30.0" in dkd.overrides
    assert dkd.config == "configs/camvid/large-4s_dkd_borrowed.yaml"
    assert dkd.needs == "step0-dkd-large-s0" or dkd.needs == "step0-dkd-large-s1"


def test_written_configs_are_the_borrowed_ones_with_the_chosen_values(tuned, tmp_path):
    import shutil

    from icd_dist.config import load_config, update

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    chosen = {"dkd": {"index": 7, "score": 0.62, "params": {
        "loss.dkd.pos_weight": 30.87, "loss.dkd.kd": 0.7468, "optim.lr_incremental": 0.002748}},
        "icd": {"index": 3, "score": 0.7, "params": {
            "loss.icd.stats": ["mean", "std", "max"], "loss.seg": "pseudo_ce",
            "loss.icd.lambda_int": 0.0123}}}
    written = tuned.write_configs(chosen, tmp_path)
    assert len(written) == 4
    for task in tuned.FRESH_TASKS:
        for method, choice in chosen.items():
            shipped = load_config(tmp_path / f"configs/camvid/{task}_{method}.yaml")
            borrowed = load_config(tmp_path / f"configs/camvid/{task}_{method}_borrowed.yaml")
            values = {k: tuple(v) if isinstance(v, list) else v
                      for k, v in choice["params"].items()}
            assert shipped == update(borrowed, values)
    # DKD's CamVid recipe (head_lr_factor 1) is kept beside the chosen values
    assert load_config(tmp_path / "configs/camvid/large-4s_dkd.yaml").loss.dkd.head_lr_factor \
        == 1.0
    assert "trial 7" in (tmp_path / "configs/camvid/large-2s_dkd.yaml").read_text()

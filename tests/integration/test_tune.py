"""`python -m icd_dist.tune` on local Ray (CPU): a 4-trial PLOP sweep over its POD weight and
the incremental lr, on 2 schedules sharing one step 0, killed mid-way and resumed; and an ICD
sweep over loss.seg where ASHA stops a planted bad trial."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import ray_stop, run_until_then_kill

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

# The demo's synthetic data at a smaller size
SMALL = [
    "data.synthetic.num_train=32", "data.synthetic.num_eval=12", "data.synthetic.height=48",
    "data.synthetic.width=48", "data.crop_size=48", "data.eval_size=48",
    "model.head_channels=32"]
# one worker per trial with 0.9 CPU, so two trials (0.9 + a 0.05 CPU driver each) train at
# once on 2 cores
SWEEP = [
    *SMALL, "optim.epochs=2", "engine.cpus_per_worker=0.9", "tune.num_samples=2",
    "tune.schedules=[2-1,2-2]",
    "logging.wandb=offline", "logging.log_every=1", "logging.num_overlays=1",
]


def tune_cmd(tmp_path, *overrides):
    return [sys.executable, "-m", "icd_dist.tune", "--config", "configs/tune/demo_plop.yaml",
            f"data.train_shards={tmp_path}/data/train", f"data.eval_shards={tmp_path}/data/val",
            f"run.storage_path={tmp_path}/runs", *overrides]


def terminated_trials(sweep: Path) -> set[str]:
    """Trial ids Tune's last saved experiment state records as TERMINATED."""
    done = set()
    for state in sorted((sweep / "tune").glob("experiment_state-*.json")):
        try:
            data = json.loads(state.read_text())
        except (json.JSONDecodeError, OSError):
            continue  # being rewritten right now
        for entry in data["trial_data"]:
            trial = json.loads(entry[0])
            if trial["status"] == "TERMINATED":
                done.add(trial["trial_id"])
    return done


def test_sweep_shares_step0_survives_driver_kill_and_writes_runnable_best(tmp_path, own_ray):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline",
           "RAY_TMPDIR": own_ray}
    sweep = tmp_path / "runs" / "tune-demo-plop"
    # Kill the driver once at least one trial is recorded finished and the sweep is not.
    run_until_then_kill(tune_cmd(tmp_path, *SWEEP), ROOT, env, tmp_path / "first.log",
                        lambda: bool(terminated_trials(sweep)))
    assert not (sweep / "tune_summary.json").exists(), "the sweep ended before the kill"
    finished_before = terminated_trials(sweep)
    attempts_before = {t: json.loads((sweep / "trials" / t / "attempts.json").read_text())
                       for t in finished_before}
    try:
        resumed = subprocess.run(tune_cmd(tmp_path, *SWEEP), cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=900)
    finally:
        ray_stop(env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming" in resumed.stderr
    # The console, first run and resumed: the sweep's lines (one per trial step among them),
    # none of Ray Train's, DeepSpeed's or Tune's own.
    console = (tmp_path / "first.log").read_text() + resumed.stderr + resumed.stdout
    noise = [n for n in ("TrainController", "TrainingReport", "Reporting training result",
                         "untested optimizer", "Trial status", "== Status ==") if n in console]
    assert not noise, noise
    assert re.search(r"^trial \w+ 2-[12] step 1/[12]: old \d", console, re.M), console[-3000:]

    summary = json.loads((sweep / "tune_summary.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 4
    assert sorted(t["schedule"] for t in trials) == ["2-1", "2-1", "2-2", "2-2"]
    assert all(t["status"] in ("finished", "stopped") for t in trials), trials
    # Random search: each sampled weight set ran on both schedules, and each trial trained
    # with its values, drawn from the space of configs/tune/demo_plop.yaml.
    weights = {json.dumps(t["params"], sort_keys=True) for t in trials}
    assert len(weights) == 2
    assert summary["space"] == {"loss.pod.lambda_pod": {"loguniform": [0.001, 0.1]},
                                "optim.lr_incremental": {"loguniform": [0.005, 0.05]}}
    for t in trials:
        pod, lr = t["params"]["loss.pod.lambda_pod"], t["params"]["optim.lr_incremental"]
        assert 0.001 <= pod <= 0.1 and 0.005 <= lr <= 0.05, t["params"]
        ran = yaml.safe_load((sweep / "trials" / t["trial_id"] / "config.yaml").read_text())
        assert ran["method"]["name"] == "plop"
        assert (ran["loss"]["pod"]["lambda_pod"], ran["optim"]["lr_incremental"]) == (pod, lr)
    # 2-1 and 2-2 share step 0: one key, trained once, copied by every trial.
    step0 = summary["step0"]
    assert len(step0["keys"]) == 1 and step0["trainings_run"] == 1
    assert step0["reused"] == 4
    for t in trials:
        assert not list((sweep / "trials" / t["trial_id"] / "ray").glob("*step0*"))
    # Trials finished before the kill were not run again.
    for trial_id, attempts in attempts_before.items():
        now = json.loads((sweep / "trials" / trial_id / "attempts.json").read_text())
        assert now == attempts, f"{trial_id} ran again after the resume"
    # Output: best configs, the plot, one W&B run per trial in the driver's folder.
    assert set(summary["best_configs"]) == {"2-1", "2-2", "overall"}
    assert (sweep / "weights_vs_metric.png").stat().st_size > 0
    assert len(list((sweep / "wandb" / "wandb").glob("offline-run-*"))) >= 4
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    chosen = summary["best_overall"]["params"]
    assert best["loss"]["pod"]["lambda_pod"] == chosen["loss.pod.lambda_pod"]
    assert best["optim"]["lr_incremental"] == chosen["optim.lr_incremental"]

    # best.yaml runs as it is, from the sweep's shared step 0 (what a user does next)
    from icd_dist.train.step0_cache import Step0Cache

    shared = Step0Cache(str(tmp_path / "runs")).run_folder(next(iter(step0["keys"]))).uri()
    ran = subprocess.run([sys.executable, "-m", "icd_dist.run", "--config",
                          str(sweep / "best.yaml"), f"run.storage_path={tmp_path}/best",
                          "--step0-from", shared],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "step 0: taken from" in ran.stderr
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    assert result["final_miou_all"] is not None


def test_asha_stops_a_planted_bad_trial_of_an_icd_sweep_over_loss_seg(tmp_path, monkeypatch):
    """An ICD sweep whose space holds a choice, loss.seg (MiB's unbiased CE or PLOP's
    pseudo-labels), and lambda_int. Two points run one after the other on a 3-step schedule:
    a sane one with pseudo-labels, and one with unbiased CE and a distillation weight so huge
    that its loss overflows and its weights turn to NaN (DDP: DeepSpeed would skip the
    overflowing steps). At step 1 it is far below the sane trial (ASHA's cutoff at a rung
    holding one result is that result), so ASHA stops it there. The paths are relative, as
    in the demo config: each trial runs in its own working directory and must still find
    the shared step 0."""
    from icd_dist.config import load_config
    from icd_dist.train.sweep import run_sweep

    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs" / "tune" / "demo.yaml", [
        "data.train_shards=data/train", "data.eval_shards=data/val",
        "run.storage_path=runs", "tune.schedules=[2-1]", "tune.max_concurrent=1",
        "tune.num_samples=2", "optim.epochs=15", "optim.epochs_incremental=3",
        "engine.engine=ddp", "logging.wandb=disabled", *SMALL,
        "tune.space.loss.seg={choice: [unbiased_ce, pseudo_ce]}",
        # each trial a TorchTrainer inside its Tune trial (the demo's trials train in-process)
        "engine.launcher=ray"])
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_sweep(cfg, points=[
            {"loss.icd.lambda_int": 1.0, "loss.icd.lambda_ext": 10.0, "loss.seg": "pseudo_ce"},
            {"loss.icd.lambda_int": 1e300, "loss.icd.lambda_ext": 10.0,
             "loss.seg": "unbiased_ce"}])
    finally:
        ray.shutdown()
    by_weight = {t["params"]["loss.icd.lambda_int"]: t for t in summary["trials"]}
    assert set(by_weight) == {1.0, 1e300}
    bad, good = by_weight[1e300], by_weight[1.0]
    assert bad["status"] == "stopped" and bad["last_step"] == 1, bad
    assert good["status"] == "finished" and good["last_step"] == 2, good
    assert good["steps"][1]["miou_all"] > bad["steps"][1]["miou_all"]
    assert summary["best_per_schedule"]["2-1"]["params"] == {
        "loss.icd.lambda_int": 1.0, "loss.icd.lambda_ext": 10.0, "loss.seg": "pseudo_ce"}
    # each trial trained with its loss.seg: the sane one on PLOP's pseudo-labels
    for trial, seg in ((good, "pseudo_ce"), (bad, "unbiased_ce")):
        ran = yaml.safe_load((tmp_path / "runs" / "tune-demo" / "trials" / trial["trial_id"] /
                              "config.yaml").read_text())
        assert (ran["method"]["name"], ran["loss"]["seg"]) == ("icd", seg)


def test_sweep_console_has_trial_lines_only_and_a_resumed_sweep_keeps_it(tmp_path, capfd,
                                                                        monkeypatch):
    """The Tuner as run_sweep builds it, with trials that only report: the console holds
    SweepConsole's lines, one per trial start, step and end, and nothing of Tune's own (its
    experiment, status and per-trial tables). Restoring the sweep replaces the callbacks
    pickled at its start with this driver's."""
    from icd_dist.config import load_config
    from icd_dist.train.ray_session import init_ray

    cfg = load_config(ROOT / "configs" / "tune" / "demo.yaml", [
        "tune.schedules=[2-1]", "tune.num_samples=2", "tune.scheduler=none",
        "logging.wandb=disabled"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert init_ray(cfg)  # as run_sweep starts it
    try:
        check_console(cfg, tmp_path, capfd)
    finally:
        import ray

        ray.shutdown()


def check_console(cfg, tmp_path, capfd):
    """Two trials of two reported steps through the sweep's Tuner, then its restore."""
    from icd_dist.train.storage import Storage
    from icd_dist.train.sweep import _tuner, search_space, sweep_space
    from icd_dist.train.sweep_console import fit_quietly

    def report_two_steps(config):  # a trial that only reports, as sweep_trial does
        from ray import tune

        for step in (1, 2):
            tune.report({"step": step, "score": 0.5, "schedule": config["schedule"],
                         "miou_all": 0.5, "miou_old": 0.6, "miou_new": 0.4 * step,
                         "hiou": 0.48})

    space = search_space(sweep_space(cfg))
    capfd.readouterr()
    storage = Storage(str(tmp_path / "runs")).child("console")
    lines: list[str] = []
    tuner, restored = _tuner(cfg, report_two_steps, space, ["2-1"], {"2-1": 2},
                             storage, "console", None, 1, lines.append)
    assert not restored
    fit_quietly(tuner)
    out, err = capfd.readouterr()
    printed = [ln for ln in (out + err).splitlines() if ln.strip()]
    assert not printed, "\n".join(printed)
    trial_lines = [ln for ln in lines if not ln.startswith("sweep ")]  # + status lines if slow
    assert len(trial_lines) == 8, "\n".join(lines)
    for ln in trial_lines:
        assert re.fullmatch(r"trial \w+_0000[01] 2-1(: started with lambda_ext=\S+, "
                            r"lambda_int=\S+| step [12]/2: old 60.00 new (40|80).00 all 50.00 "
                            r"hIoU 48.00|: finished)", ln), ln

    again: list[str] = []
    tuner, restored = _tuner(cfg, report_two_steps, space, ["2-1"], {"2-1": 2},
                             storage, "console", None, 1, again.append)
    assert restored
    run_config = tuner._local_tuner.get_run_config()
    assert run_config.verbose == 0
    assert [c.log for c in run_config.callbacks] == [again.append]

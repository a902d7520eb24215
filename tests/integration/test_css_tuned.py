"""tools/css_tuned.py --smoke on real CamVid images: two methods' sweeps (2 trials each, the
borrowed values first, one step 0 shared), each method's best trial on val chosen and re-run
on a fresh seed on large-2s and large-4s, scored on val and on the held-out drive; a re-run
of the search reuses the finished sweeps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import camvid_root

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_smoke_study_tunes_each_method_equally_and_judges_the_choice_on_a_fresh_seed(tmp_path):
    from icd_dist.config import load_config
    from icd_dist.train.sweep import config_point, sweep_space

    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, "tools/css_tuned.py", "--smoke", "--camvid", str(camvid_root()),
               "--work", str(work), "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ}, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["smoke"] and results["fresh_seeds"] == [0] and results["search_seed"] == 100
    assert results["versions"]["torch"] and results["device"].startswith("CPU")
    sweeps, chosen = results["sweeps"], results["chosen"]
    assert set(sweeps) == set(chosen) == {"mib", "icd"}
    smoke = work / "smoke"
    for method, sweep in sweeps.items():
        trials = sweep["trials"]
        assert len(trials) == 2 and all(t["status"] == "finished" for t in trials)
        # the first trial ran the borrowed values, on val, never on the held-out drive
        cfg = load_config(ROOT / f"configs/tune/camvid-large_{method}.yaml")
        borrowed = {k: list(v) if isinstance(v, tuple) else v
                    for k, v in config_point(cfg, sweep_space(cfg)).items()}
        assert trials[0]["params"] == borrowed
        ran = yaml.safe_load((smoke / "sweeps" / sweep["sweep"] / "config.yaml").read_text())
        assert ran["data"]["eval_shards"].endswith("/val")
        assert ran["data"]["train_shards"].endswith("/train_minus_0006R0")
        # the chosen trial is the best on val
        best = max(trials, key=lambda t: t["score"])
        assert chosen[method]["trial_id"] == best["trial_id"]
        assert chosen[method]["params"] == best["params"]
        assert (out / f"search_{method}.png").stat().st_size > 0
        # W&B (offline): the sweep's trials and their steps, in its group's folder
        assert list((smoke / "sweeps" / sweep["sweep"] / "wandb").rglob("offline-run-*"))
        assert results["wandb_groups"][method] == sweep["sweep"]
    # one step 0 for both sweeps, trained once: the second reused the first's
    keys = [s["step0"]["keys"] for s in sweeps.values()]
    assert len(keys[0]) == 1 and keys[0].keys() == keys[1].keys()
    assert all(k["trainings"] == 1 for ks in keys for k in ks.values())
    rows = {(r["task"], r["label"]): r for r in results["rows"] if r["kind"] == "method"}
    assert set(rows) == {(t, m) for t in ("large-2s", "large-4s") for m in ("mib", "icd")}
    for (task, method), row in rows.items():
        assert row["seeds"] == [0] and row["heldout"]["all"] is not None
        # the fresh run trained with the chosen values, at the fresh seed
        run_name = row["command"].split("run.name=")[1].split()[0]
        ran = load_config(smoke / "runs" / run_name / "config.yaml")
        assert ran.run.seed == 0 and ran.task.name == task
        for key, value in chosen[method]["params"].items():
            got = ran
            for part in key.split("."):
                got = getattr(got, part)
            assert (list(got) if isinstance(got, tuple) else got) == pytest.approx(value)
    assert {(p["task"], p["b"], p["eval_set"]) for p in results["paired"]} == {
        (t, "mib", e) for t in ("large-2s", "large-4s") for e in ("val", "heldout")}
    curves = results["per_step_large-4s"]
    assert set(curves) == {"mib", "icd"} and curves["icd"]["steps"] == [0, 1, 2, 3]
    assert (out / "old_new_per_step_large-4s.png").stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "## Search" in table and "(borrowed)" in table and "**chosen**" in table
    assert "## Readings" in table and "tuned ICD is" in table

    # resumable: the search again reuses both sweeps (no Ray, no trial), same choices
    again = subprocess.run([*command, "--phase", "search"], cwd=ROOT, env={**os.environ},
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "sweeps to run" not in again.stdout
    assert json.loads((out / "results.json").read_text())["chosen"] == chosen

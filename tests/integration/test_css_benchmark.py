"""tools/css_benchmark.py --smoke on real CamVid images: one method pair (ft, icd) on large-2s
from one shared step 0 per seed, two seeds, every run through `python -m icd_dist.run` in its
own process (the tool's default launcher) and scored on val and on the held-out drive (out of
training)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CAMVID = ROOT.parent / "shared" / "data" / "camvid"
pytestmark = pytest.mark.integration


@pytest.mark.skipif(not (CAMVID / "train.txt").is_file(),
                    reason=f"CamVid not found at {CAMVID} (../shared/data/camvid beside the "
                           "repository)")
def test_smoke_benchmark_writes_the_table_from_one_shared_step0(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "tools/css_benchmark.py", "--smoke", "--seeds", "0",
                           "1", "--work", str(tmp_path / "work"), "--out", str(out)], cwd=ROOT,
                          env={**os.environ}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    results = json.loads((out / "results.json").read_text())
    rows = {(r["kind"], r["task"], r["label"]): r for r in results["rows"]}
    assert set(rows) == {("step0", "step0-large", "step 0 (shared)"),
                         ("method", "large-2s", "ft"), ("method", "large-2s", "icd")}
    for row in rows.values():
        assert row["seeds"] == [0, 1] and row["wall_min"] > 0
        for eval_set in ("val", "heldout"):
            stats = row[eval_set]
            assert 0.0 <= stats["all"] <= 100.0 and len(stats["per_seed"]) == 2
            values = [s["all"] for s in stats["per_seed"]]
            assert stats["all"] == pytest.approx(sum(values) / 2)
            assert stats["all_std"] == pytest.approx(abs(values[0] - values[1]) / 2)
    for method in ("ft", "icd"):
        row = rows[("method", "large-2s", method)]
        assert row["val"]["new"] is not None and row["heldout"]["hiou"] is not None
        assert "--step0-from" in row["command"] and f"large-2s_{method}.yaml" in row["command"]
    assert "--last-step 0" in rows[("step0", "step0-large", "step 0 (shared)")]["command"]
    assert results["versions"]["torch"] and results["smoke"] is True
    assert results["launcher"] == "local"
    assert all("engine.launcher=local" in r["command"] for r in rows.values())
    assert results["eval_sets"]["heldout"]["images"] == 8 and results["heldout_drive"]
    # the held-out scores are the evaluation of each run's last model on the held-out shards
    from icd_dist.evaluate import evaluate_run

    work = tmp_path / "work" / "smoke"
    # a run's folder is its key (large-2s-icd-s1, tagged where the shipped values are tuned)
    names = {label: rows[("method", "large-2s", label)]["command"].split("run.name=")[1]
             .split()[0].removesuffix("-s0") for label in ("ft", "icd")}
    direct = evaluate_run(str(work / "runs" / f"{names['icd']}-s1"),
                          str(work / "shards" / "heldout_0006R0"))
    assert rows[("method", "large-2s", "icd")]["heldout"]["per_seed"][1]["all"] == \
        pytest.approx(100 * direct["miou_all"])
    held = (work / "shards" / "heldout_0006R0.txt").read_text()
    assert "0006R0" in held and "0006R0" not in (work / "shards" /
                                                 "train_minus_0006R0.txt").read_text()
    # ICD minus ft, per seed, on both eval sets
    assert {(p["b"], p["eval_set"]) for p in results["paired"]} == {("ft", "val"),
                                                                   ("ft", "heldout")}
    assert (out / "per_class_iou_large-2s.png").stat().st_size > 0
    # the continual runs took the very model their seed's step 0 trained, not their own
    runs = tmp_path / "work" / "smoke" / "runs"
    by_seed = [{json.loads((runs / f"{name}-s{seed}" / "step_0" / "metrics.json").read_text())
                ["student_digests"][0] for name in ("step0-large", names["ft"], names["icd"])}
               for seed in (0, 1)]
    assert len(by_seed[0]) == len(by_seed[1]) == 1 and by_seed[0] != by_seed[1]
    table = (out / "results.md").read_text()
    assert "| ft |" in table and "| icd |" in table and "--smoke" in table
    # in-process runs: no Ray session was ever created under this test's RAY_TMPDIR (set by
    # tests/conftest.py for its Ray-free tests; the runs inherited it)
    assert not list((Path(os.environ["RAY_TMPDIR"]) / "ray").glob("session_*"))

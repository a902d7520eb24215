"""tools/css_benchmark.py --smoke on real CamVid images: one method pair (ft, icd) on 6-5
from one shared step 0 per seed, two seeds, every run through `python -m icd_dist.run` on the
tool's own Ray."""

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
    assert set(rows) == {("step0", "step0", "step 0 (shared)"), ("method", "6-5", "ft"),
                         ("method", "6-5", "icd")}
    for row in rows.values():
        assert 0.0 <= row["all"] <= 100.0 and row["wall_min"] > 0
        assert row["seeds"] == [0, 1] and len(row["per_seed"]) == 2
        values = [s["all"] for s in row["per_seed"]]
        assert row["all"] == pytest.approx(sum(values) / 2)
        assert row["all_std"] == pytest.approx(abs(values[0] - values[1]) / 2)
    for method in ("ft", "icd"):
        row = rows[("method", "6-5", method)]
        assert row["new"] is not None and row["hiou"] is not None
        assert "--step0-from" in row["command"] and f"6-5_{method}.yaml" in row["command"]
    assert "--last-step 0" in rows[("step0", "step0", "step 0 (shared)")]["command"]
    assert results["versions"]["torch"] and results["smoke"] is True
    # the continual runs took the very model their seed's step 0 trained, not their own
    runs = tmp_path / "work" / "smoke" / "runs"
    by_seed = [{json.loads((runs / f"{name}-s{seed}" / "step_0" / "metrics.json").read_text())
                ["student_digests"][0] for name in ("step0", "6-5-ft", "6-5-icd")}
               for seed in (0, 1)]
    assert len(by_seed[0]) == len(by_seed[1]) == 1 and by_seed[0] != by_seed[1]
    table = (out / "results.md").read_text()
    assert "| ft |" in table and "| icd |" in table and "--smoke" in table
    # the tool stopped the Ray it started: nothing of it is left answering
    status = subprocess.run([str(Path(sys.executable).with_name("ray")), "status"],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode != 0

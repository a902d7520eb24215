"""tools/css_benchmark.py --smoke on real CamVid images: one method pair (ft, icd) on 6-5
from one shared step 0, every run through `python -m icd_dist.run` on the tool's own Ray."""

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
    done = subprocess.run([sys.executable, "tools/css_benchmark.py", "--smoke", "--work",
                           str(tmp_path / "work"), "--out", str(out)], cwd=ROOT,
                          env={**os.environ}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    results = json.loads((out / "results.json").read_text())
    rows = {(r["kind"], r["task"], r["label"]): r for r in results["rows"]}
    assert set(rows) == {("step0", "step0", "step 0 (shared)"), ("method", "6-5", "ft"),
                         ("method", "6-5", "icd")}
    for row in rows.values():
        assert 0.0 <= row["all"] <= 100.0 and row["wall_min"] > 0
    for method in ("ft", "icd"):
        row = rows[("method", "6-5", method)]
        assert row["new"] is not None and row["hiou"] is not None
        assert "--step0-from" in row["command"] and f"6-5_{method}.yaml" in row["command"]
    assert "--last-step 0" in rows[("step0", "step0", "step 0 (shared)")]["command"]
    assert results["versions"]["torch"] and results["smoke"] is True
    # the continual runs took the very model step 0 trained, not one of their own
    runs = tmp_path / "work" / "runs"
    digests = {json.loads((runs / name / "step_0" / "metrics.json").read_text())
               ["student_digests"][0] for name in ("step0-s0", "6-5-ft-s0", "6-5-icd-s0")}
    assert len(digests) == 1
    table = (out / "results.md").read_text()
    assert "| ft |" in table and "| icd |" in table and "--smoke" in table
    # the tool stopped the Ray it started: nothing of it is left answering
    status = subprocess.run([str(Path(sys.executable).with_name("ray")), "status"],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode != 0

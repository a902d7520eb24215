"""tools/bench_loss.py runs end to end on a small size and writes its table and JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_bench_loss_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "bench_loss.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_loss.py"), "--batch", "2",
                           "--crop", "64", "--repeats", "1", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fwd+bwd ms" in proc.stdout and "vs eager" in proc.stdout
    data = json.loads(out.read_text())
    assert data["device"].startswith("CPU:") and data["versions"]["torch"] == torch.__version__
    rows = {r["impl"]: r for r in data["results"]}
    assert rows["triton"]["skipped"]  # a CPU: the interpreter is no speed path
    eager, compiled = rows["eager"], rows["compiled"]
    assert eager["seconds"] > 0 and compiled["seconds"] > 0 and eager["speedup_vs_eager"] == 1
    # Both implementations computed the same losses on the same taps.
    assert compiled["loss_int"] == pytest.approx(eager["loss_int"], rel=1e-3)
    assert compiled["loss_ext"] == pytest.approx(eager["loss_ext"], rel=1e-2, abs=1e-7)

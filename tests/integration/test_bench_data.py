"""tools/bench_data.py runs end to end (tiny budget) and writes its table and JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_bench_data_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_data.py"), "--images",
                           "16", "--rounds", "1", "--batch", "4", "--crop", "128", "--workers",
                           "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch/DALI" in proc.stdout and "512x512" in proc.stdout
    data = json.loads(out.read_text())
    assert data["env"]["device"].startswith("CPU:")
    assert len(data["results"]) == 2
    for row in data["results"]:
        assert row["dali_cpu"] > 0 and row["torch"] > 0 and row["plain"] > 0

"""tools/bench_shard_reads.py runs end to end on a few samples (moto's S3 on loopback, started
and stopped by the tool) and writes its table and JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_bench_shard_reads_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "reads.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_shard_reads.py"),
                           "--samples", "24", "--size", "40", "56", "--shard-size", "16KB",
                           "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples/s" in proc.stdout and "streamed (webdataset)" in proc.stdout
    data = json.loads(out.read_text())
    assert data["samples"] == 24 and data["shards"] >= 2
    assert data["versions"]["webdataset"] and "moto" in data["device"]
    rows = {r["mode"]: r for r in data["results"]}
    assert set(rows) == {"ranged, epoch order", "ranged, shard order", "streamed (webdataset)"}
    # two range requests a sample, one GET a shard; the same bytes every way
    assert rows["ranged, epoch order"]["requests"] == 48
    assert rows["streamed (webdataset)"]["requests"] == data["shards"]
    assert len({r["megabytes"] for r in rows.values()}) == 1
    assert all(r["seconds"] > 0 for r in rows.values())

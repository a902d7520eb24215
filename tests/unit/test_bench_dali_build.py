"""tools/bench_dali_build.py runs end to end and writes its JSON."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("nvidia.dali", reason="DALI is not installed here")
TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_dali_build.py"


def test_bench_dali_build_writes_both_modes(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_dali_build", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "b.json"
    assert tool.main(["--epochs", "2", "--repeats", "1", "--samples", "4", "--out",
                      str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["rows"]] == ["train", "eval"]
    for r in report["rows"]:
        assert r["built_per_epoch_s"] > 0 and r["built_once_s"] > 0
        assert r["ratio"] == pytest.approx(r["built_per_epoch_s"] / r["built_once_s"])
    assert "DALI" in report["device"] and "build ms/epoch" in capsys.readouterr().out

"""tools/compare_benchmarks.py: rows matched by task and label, changes in points."""

import importlib.util
import json
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "compare_benchmarks.py"


@pytest.fixture(scope="module")
def cmp():
    spec = importlib.util.spec_from_file_location("compare_benchmarks", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(task, label, old, new, all_, hiou):
    return {"task": task, "label": label, "old": old, "new": new, "all": all_, "hiou": hiou}


def test_changes_by_task_and_label(cmp, tmp_path):
    before = {"command": "b", "rows": [_row("6-5", "plop", 54.6, 1.6, 30.5, 3.0),
                                       _row("6-1", "plop", 52.6, 0.0, 28.7, 0.0),
                                       _row("step0", "step 0 (shared)", 50.2, None, 50.2, None)]}
    after = {"command": "a", "rows": [_row("step0", "step 0 (shared)", 51.0, None, 51.0, None),
                                      _row("6-1", "plop", 50.0, 2.5, 28.0, 4.6),
                                      _row("6-5", "mib", 52.0, 3.0, 30.0, 5.7)]}
    entries = cmp.compare(before, after)
    assert [e["label"] for e in entries] == ["step 0 (shared)", "plop", "mib"]
    step0, plop, mib = entries
    assert step0["old_change"] == pytest.approx(0.8) and step0["new_change"] is None
    assert plop["old_change"] == pytest.approx(-2.6)  # matched to 6-1, not 6-5
    assert plop["new_change"] == pytest.approx(2.5) and plop["hiou_before"] == 0.0
    assert mib["all_change"] is None  # no such row before
    table = cmp.format_table(entries)
    assert "| 6-1 | plop | 50.0 (-2.6) | 2.5 (+2.5) | 28.0 (-0.7) | 4.6 (+4.6) |" in table
    assert "| 6-5 | mib | 52.0 (new row) |" in table
    b, a = tmp_path / "b.json", tmp_path / "a.json"
    b.write_text(json.dumps(before))
    a.write_text(json.dumps(after))
    assert cmp.main([str(b), str(a), "--out", str(tmp_path / "out" / "change.md")]) == 0
    written = json.loads((tmp_path / "out" / "change.json").read_text())
    assert written["before"]["command"] == "b" and len(written["rows"]) == 3
    assert table in (tmp_path / "out" / "change.md").read_text()


def test_reads_the_val_scores_of_results_with_a_heldout_set(cmp):
    before = {"rows": [_row("large-2s", "icd", 80.0, 40.0, 60.0, 53.3)]}
    nested = {"task": "large-2s", "label": "icd", "heldout": {"all": 10.0},
              "val": {"old": 85.0, "new": 46.0, "all": 67.0, "hiou": 60.0}}
    (entry,) = cmp.compare(before, {"rows": [nested]})
    assert entry["all"] == 67.0 and entry["all_change"] == 7.0
    assert entry["new_change"] == 6.0 and entry["old_change"] == 5.0

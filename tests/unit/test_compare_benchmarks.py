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


def test_one_seeds_scores_on_either_set(cmp, tmp_path):
    def row(label, seeds, val, heldout):
        def scores(per):
            return {"per_seed": [{"old": o, "new": n, "all": a, "hiou": h}
                                 for o, n, a, h in per],
                    "all": sum(p[2] for p in per) / len(per)}
        return {"task": "large-2s", "label": label, "seeds": seeds,
                "val": scores(val), "heldout": scores(heldout)}
    before = {"rows": [row("mib", [0, 1, 2], [(80, 40, 60, 53), (92, 52, 72, 64), (71, 31, 51, 42)],
                           [(60, 20, 40, 30), (61, 21, 41, 31), (62, 22, 42, 32)]),
                       row("dkd", [1, 2], [(1, 1, 1, 1)] * 2, [(1, 1, 1, 1)] * 2)]}
    after = {"rows": [row("mib", [0], [(85, 46, 67, 60)], [(63, 19, 44, 29)]),
                      row("dkd", [0], [(5, 5, 5, 5)], [(5, 5, 5, 5)])]}
    mib, dkd = cmp.compare(before, after, seed=0)
    assert (mib["old_change"], mib["new_change"], mib["all_change"]) == (5, 6, 7)  # seed 0's
    assert dkd["all"] == 5 and dkd["all_change"] is None  # no seed 0 before
    (mib_h, _) = cmp.compare(before, after, seed=0, eval_set="heldout")
    assert (mib_h["all"], mib_h["all_change"], mib_h["new_change"]) == (44, 4, -1)
    assert cmp.compare(before, after)[0]["all_change"] == pytest.approx(67 - 61)  # the means
    b, a = tmp_path / "b.json", tmp_path / "a.json"
    b.write_text(json.dumps(before))
    a.write_text(json.dumps(after))
    assert cmp.main([str(b), str(a), "--seed", "0", "--out", str(tmp_path / "c.md")]) == 0
    assert "seed 0, val scores" in (tmp_path / "c.md").read_text()

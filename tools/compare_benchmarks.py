"""The change of every row between two CamVid benchmark results (tools/css_benchmark.py).

    python tools/compare_benchmarks.py BEFORE/results.json AFTER/results.json \
        --out tools/results/css_benchmark/natural_6-5_6-1/change.md

Rows are matched by (task, label); each metric (old / new / all mIoU, hIoU, in points) is
printed as `after (change)`. Prints a markdown table and writes it with a JSON twin (both
files' commands, dates, devices and versions) beside --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = ("old", "new", "all", "hiou")


def row_key(row: dict) -> tuple[str, str]:
    """How a row is matched between two results: its task and label."""
    return row["task"], row["label"]


def _value(row: dict | None, metric: str) -> float | None:
    """A row's val score: nested under "val" in results since the held-out set was added,
    at the top level in earlier ones."""
    if row is None:
        return None
    return row["val"].get(metric) if isinstance(row.get("val"), dict) else row.get(metric)


def compare(before: dict, after: dict) -> list[dict]:
    """Per row of `after` (in its order): after's metrics and after - before where both have
    the row and the metric (None otherwise)."""
    old_rows = {row_key(r): r for r in before["rows"]}
    out = []
    for row in after["rows"]:
        prev = old_rows.get(row_key(row))
        entry = {"task": row["task"], "label": row["label"]}
        for m in METRICS:
            value, prior = _value(row, m), _value(prev, m)
            entry[m] = value
            entry[f"{m}_before"] = prior
            entry[f"{m}_change"] = value - prior if value is not None and prior is not None \
                else None
        out.append(entry)
    return out


def _cell(entry: dict, metric: str) -> str:
    value, change = entry[metric], entry[f"{metric}_change"]
    if value is None:
        return "-"
    return f"{value:.1f} ({change:+.1f})" if change is not None else f"{value:.1f} (new row)"


def format_table(entries: list[dict]) -> str:
    """Markdown table: one line per row, `after (change)` per metric."""
    lines = ["| task | row | old | new | all | hIoU |", "|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['task']} | {e['label']} | "
                     + " | ".join(_cell(e, m) for m in METRICS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path, help="results.json of the earlier benchmark")
    p.add_argument("after", type=Path, help="results.json of the later benchmark")
    p.add_argument("--out", type=Path, help="write the table here (.md) and a .json beside it")
    args = p.parse_args(argv)
    before, after = (json.loads(path.read_text()) for path in (args.before, args.after))
    entries = compare(before, after)
    table = format_table(entries)
    print(table)
    if args.out:
        meta = {name: {k: d.get(k) for k in ("command", "date", "device", "versions", "seeds")}
                for name, d in (("before", before), ("after", after))}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# CamVid benchmark: change of every row\n\nbefore: `{meta['before']['command']}` "
            f"({meta['before']['date']}); after: `{meta['after']['command']}` "
            f"({meta['after']['date']}); mIoU % as `after (after - before)`.\n\n{table}\n")
        args.out.with_suffix(".json").write_text(json.dumps({**meta, "rows": entries},
                                                            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The change of every row between two CamVid benchmark results (tools/css_benchmark.py).

    python tools/compare_benchmarks.py BEFORE/results.json AFTER/results.json \
        --out tools/results/css_benchmark/natural_6-5_6-1/change.md
    python tools/compare_benchmarks.py BEFORE/results.json AFTER/results.json --seed 0 \
        --eval-set heldout     # one seed's scores of both (a 1-seed re-run vs a 3-seed table)

Rows are matched by (task, label); each metric (old / new / all mIoU, hIoU, in points) is
printed as `after (change)`: the mean over seeds, or with --seed that seed's own score in
both files (a row without that seed counts as absent). Prints a markdown table and writes it
with a JSON twin (both files' commands, dates, devices and versions) beside --out.
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


def _value(row: dict | None, metric: str, seed: int | None = None,
           eval_set: str = "val") -> float | None:
    """A row's score on `eval_set`: nested under "val" / "heldout" in results since the
    held-out set was added, at the top level (val) in earlier ones; the mean over seeds, or
    with `seed` that seed's score (None where the row has no such seed)."""
    if row is None:
        return None
    scores = row.get(eval_set) if isinstance(row.get(eval_set), dict) else \
        (row if eval_set == "val" else None)
    if scores is None:
        return None
    if seed is None:
        return scores.get(metric)
    seeds = list(row.get("seeds") or [])
    if seed not in seeds or "per_seed" not in scores:
        return None
    return scores["per_seed"][seeds.index(seed)].get(metric)


def compare(before: dict, after: dict, seed: int | None = None,
            eval_set: str = "val") -> list[dict]:
    """Per row of `after` (in its order): after's metrics and after - before where both have
    the row and the metric (None otherwise); means over seeds, or `seed`'s own scores."""
    old_rows = {row_key(r): r for r in before["rows"]}
    out = []
    for row in after["rows"]:
        prev = old_rows.get(row_key(row))
        entry = {"task": row["task"], "label": row["label"]}
        for m in METRICS:
            value, prior = _value(row, m, seed, eval_set), _value(prev, m, seed, eval_set)
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
    p.add_argument("--seed", type=int, help="compare this seed's scores (default: the means)")
    p.add_argument("--eval-set", choices=("val", "heldout"), default="val",
                   help="which evaluation set's scores (default val)")
    args = p.parse_args(argv)
    before, after = (json.loads(path.read_text()) for path in (args.before, args.after))
    entries = compare(before, after, args.seed, args.eval_set)
    table = format_table(entries)
    what = (f"seed {args.seed}" if args.seed is not None else "means over seeds") + \
        f", {args.eval_set} scores"
    print(f"{what}\n{table}")
    if args.out:
        meta = {name: {k: d.get(k) for k in ("command", "date", "device", "versions", "seeds")}
                for name, d in (("before", before), ("after", after))}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# CamVid benchmark: change of every row\n\nbefore: `{meta['before']['command']}` "
            f"({meta['before']['date']}); after: `{meta['after']['command']}` "
            f"({meta['after']['date']}); {what}; mIoU % as `after (after - before)`.\n\n"
            f"{table}\n")
        args.out.with_suffix(".json").write_text(json.dumps(
            {**meta, "seed": args.seed, "eval_set": args.eval_set, "rows": entries}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

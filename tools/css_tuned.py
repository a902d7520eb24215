"""Every method at its best for the same budget: the equal-budget tuning study on CamVid.

    search: for each of mib, plop, icd and dkd, a Ray Tune sweep of the method's own search
            space (configs/tune/camvid-large_<method>.yaml: its weights and
            optim.lr_incremental; DKD also pos_weight; ICD also tau, the statistics set and
            loss.seg), the same number of trials for every method, Optuna TPE with the same
            seed, the method's borrowed values as its first trial, on CamVid large-2s at
            seed 100 from one step 0 shared by the sweeps (DKD: its own), every trial judged
            on val all-class mIoU. The held-out drive is never seen by a sweep.
    choose: each method's best trial on val.
    fresh:  the chosen values re-run on fresh seeds (0, 1, 2: not the sweeps') on large-2s
            and on large-4s (never used for selection), ft and joint beside them, every run
            scored on val and on the held-out drive (tools/css_benchmark.py's runs, tables and
            paired-difference rule).

    python tools/css_tuned.py                       # the README's study (2.9 h here)
    python tools/css_tuned.py --phase search        # the sweeps only, and what they chose
    python tools/css_tuned.py --smoke --work /tmp/t # a tiny end-to-end check (CI)

Resumable: a re-run with the same --work reuses every finished sweep (and resumes an
unfinished one: Tune restores its finished trials) and every finished run. Writes
results.md, results.json (command, device, versions, seeds, every trial's values and
scores, the choices, the fresh runs' scores and paired differences, the phases' times) and
the figures (search_<method>.png, old_new_per_step_large-4s.png, per_class_iou_<task>.png)
to --out. W&B (offline) groups each method's sweep under the sweep's name.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import css_benchmark as bench  # noqa: E402
from bench_common import cpu_name  # noqa: E402

from icd_dist.config import load_config, nest_dotted  # noqa: E402
from icd_dist.methods import METHODS as REGISTRY  # noqa: E402
from icd_dist.train.sweep_console import format_value  # noqa: E402

TUNED = ("mib", "plop", "icd", "dkd")
SEARCH_TASK = "large-2s"
FRESH_TASKS = ("large-2s", "large-4s")
METHOD_NAMES = {"mib": "MiB", "plop": "PLOP", "icd": "ICD", "dkd": "DKD"}
SWEEP_CONFIG = "configs/tune/camvid-large_{method}.yaml"
# A chosen value in the lowest (highest) tenth of its (log) range sits at its bottom (top):
# a weight at the bottom was turned down; at either edge the range may have been too narrow.
EDGE = 0.1
# --smoke: two methods, two trials each, one fresh seed, tiny budgets and data.
SMOKE_METHODS = ("mib", "icd")
SMOKE_TRIALS = 2
TIMINGS = "timings.json"


def sweep_name(method: str) -> str:
    """run.name of `method`'s sweep (its folder under work/sweeps and its W&B group)."""
    return load_config(ROOT / SWEEP_CONFIG.format(method=method)).run.name


def sweep_jobs(methods: Sequence[str], trials: int, shards: Mapping[str, Path], sweeps: Path,
               smoke: bool) -> list[bench.Job]:
    """One `python -m icd_dist.tune` per method. The sweeps that share the CE step 0 start
    after the first of them, which trains it into the shared cache (two sweeps training the
    same step 0 at once would both train it); a method with its own step 0 (DKD) starts at
    once."""
    jobs, first_ce = [], None
    for method in methods:
        own = REGISTRY[method].trains_own_step0
        needs = None if own or first_ce is None else f"sweep-{first_ce}"
        if not own and first_ce is None:
            first_ce = method
        overrides = [f"data.train_shards={shards['train']}", f"data.eval_shards={shards['val']}",
                     f"run.storage_path={sweeps}", f"tune.num_samples={trials}",
                     *(bench.SMOKE_OVERRIDES if smoke else [])]
        jobs.append(bench.Job(f"sweep-{method}", "tune", method, "search", 100,
                              SWEEP_CONFIG.format(method=method), overrides, needs=needs))
    return jobs


def read_sweep(folder: Path) -> dict | None:
    """The sweep's tune_summary.json, its trials in the order they started (each with its
    start time and index); None when the sweep has not finished once."""
    path = folder / "tune_summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    for trial in summary["trials"]:
        attempts = folder / "trials" / trial["trial_id"] / "attempts.json"
        trial["started"] = json.loads(attempts.read_text())[0] if attempts.is_file() else ""
    summary["trials"].sort(key=lambda t: (t["started"], t["trial_id"]))
    for index, trial in enumerate(summary["trials"], 1):
        trial["index"] = index
    return summary


def sweep_finished(summary: Mapping | None, trials: int) -> bool:
    """Whether a sweep's summary holds `trials` trials that ran to their last step."""
    return summary is not None and sum(t["status"] == "finished"
                                       for t in summary["trials"]) >= trials


def choose(summary: Mapping) -> dict:
    """The best finished trial on the sweep's metric (val all-class mIoU): its index, id,
    score and values."""
    done = [t for t in summary["trials"] if t["score"] is not None]
    if not done:
        raise SystemExit(f"sweep {summary['sweep']}: no trial finished")
    best = max(done, key=lambda t: (t["score"], -t["index"]))
    return {"index": best["index"], "trial_id": best["trial_id"], "score": best["score"],
            "params": best["params"]}


def overrides_of(params: Mapping[str, object]) -> list[str]:
    """key=value overrides that set `params` (values as JSON, which the config reads as
    YAML), in key order."""
    return [f"{key}={json.dumps(value)}" for key, value in sorted(params.items())]


def range_positions(space: Mapping[str, Mapping], params: Mapping[str, object]) -> dict:
    """Where each numeric searched value lies in its range, 0 (bottom) to 1 (top), on the
    log scale for log distributions."""
    out = {}
    for key, dist in space.items():
        (kind, values), = dist.items()
        value = params.get(key)
        if kind == "choice" or not isinstance(value, (int, float)):
            continue
        low, high = values
        if kind.startswith("log"):
            out[key] = (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
        else:
            out[key] = (value - low) / (high - low)
    return out


def weight_positions(sweep: Mapping, chosen: Mapping) -> list[dict]:
    """Every numeric searched value of `sweep`'s chosen trial: its position in its range, the
    positions in the best three trials, and `edge` ("bottom" or "top" within EDGE of an end,
    else None)."""
    done = sorted((t for t in sweep["trials"] if t["score"] is not None),
                  key=lambda t: -t["score"])[:3]
    pos = range_positions(sweep["space"], chosen["params"])
    return [{"key": key, "chosen": chosen["params"][key], "position": p,
             "top3_positions": [range_positions(sweep["space"], t["params"])[key] for t in done],
             "edge": "bottom" if p < EDGE else "top" if p > 1 - EDGE else None}
            for key, p in pos.items()]


def turned_down(positions: Sequence[Mapping]) -> list[str]:
    """The weights (not optim.*) chosen at the bottom of their range."""
    return [p["key"] for p in positions if p["edge"] == "bottom"
            and not p["key"].startswith("optim.")]


def plot_search(sweep: Mapping, chosen: Mapping, path: Path) -> Path:
    """Score per trial in the order the trials ran, the best so far, the first (borrowed)
    trial and the chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = sweep["trials"]
    xs = [t["index"] for t in trials]
    ys = [100 * t["score"] if t["score"] is not None else float("nan") for t in trials]
    best, running = [], -math.inf
    for y in ys:
        running = max(running, y) if not math.isnan(y) else running
        best.append(running)
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(xs, ys, "o", label="trial (val all-mIoU)")
    ax.step(xs, best, where="post", label="best so far")
    ax.plot([xs[0]], [ys[0]], "s", mfc="none", ms=11, label="borrowed values (trial 1)")
    ax.plot([chosen["index"]], [100 * chosen["score"]], "*", ms=14, label="chosen")
    ax.set_xlabel("trial")
    ax.set_ylabel("val all-class mIoU (%)")
    ax.set_title(f"{sweep['method']}: {len(trials)} trials on {SEARCH_TASK} (seed 100)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def per_step(rows: Sequence[Mapping], jobs: Sequence[bench.Job], task: str) -> dict:
    """Per method on `task`: old and new mIoU on val after each step (mean over seeds)."""
    out = {}
    for label in [r["label"] for r in rows if r["kind"] == "method" and r["task"] == task]:
        runs = [j for j in jobs if j.kind == "method" and j.task == task and j.label == label]
        steps = sorted({s["step"] for j in runs for s in j.summary["steps"]})
        series = {}
        for metric in ("miou_old", "miou_new"):
            values = []
            for step in steps:
                got = [s[metric] for j in runs for s in j.summary["steps"]
                       if s["step"] == step and s.get(metric) is not None]
                values.append(100 * statistics.fmean(got) if got else None)
            series[metric.removeprefix("miou_")] = values
        out[label] = {"steps": steps, **series}
    return out


def plot_per_step(curves: Mapping[str, Mapping], task: str, path: Path) -> Path | None:
    """Old and new mIoU on val after each step of `task`, one line per method."""
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric in zip(axes, ("old", "new"), strict=True):
        for label, c in curves.items():
            pts = [(s, v) for s, v in zip(c["steps"], c[metric], strict=True) if v is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(f"val {metric}-class mIoU (%)")
        ax.set_title(f"{task}: {metric} classes (mean over seeds)")
        ax.set_xticks(sorted({s for c in curves.values() for s in c["steps"]}))
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def search_markdown(sweeps: Mapping[str, Mapping], chosen: Mapping[str, Mapping],
                    positions: Mapping[str, Sequence[Mapping]]) -> str:
    """The search section: per method its trials (values, val old/new/all), and where the
    chosen values lie in their ranges (weights turned down, values at an edge)."""
    out = []
    for method, sweep in sweeps.items():
        keys = list(sweep["space"])
        head = "| trial | " + " | ".join(k.split(".")[-1] for k in keys) + \
            " | val old | val new | val all |\n" + "|---" * (len(keys) + 4) + "|\n"
        lines = []
        for t in sweep["trials"]:
            last = t["steps"][-1] if t["steps"] else {}
            cells = [format_value(t["params"].get(k)) for k in keys]
            mark = " (borrowed)" if t["index"] == 1 else ""
            mark += " **chosen**" if t["trial_id"] == chosen[method]["trial_id"] else ""
            quality = [_pct(last.get(k)) for k in ("miou_old", "miou_new")]
            lines.append(f"| {t['index']}{mark} | " + " | ".join(cells) + " | "
                         + " | ".join(quality) + f" | {_pct(t['score'])} |\n")
        space = ", ".join(f"{k} {kind} {values}" for k, d in sweep["space"].items()
                          for kind, values in d.items())
        ranges = [f"- {d['key']}: chosen {format_value(d['chosen'])}, at {d['position']:.2f} "
                  "of its range (0 = bottom, 1 = top); the best three trials at "
                  + ", ".join(f"{p:.2f}" for p in d["top3_positions"])
                  + {"bottom": " - **at the bottom**"
                     + ("" if d["key"].startswith("optim.") else ": turned down"),
                     "top": " - **at the top**", None: ""}[d["edge"]]
                  for d in positions.get(method, ())]
        out.append(f"**{method}** ({len(sweep['trials'])} trials; space: {space})\n\n"
                   + head + "".join(lines)
                   + ("\nChosen values in their ranges:\n\n" + "\n".join(ranges) + "\n"
                      if ranges else "")
                   + f"\n![{method} search](search_{method}.png)\n")
    return "\n".join(out)


def write_configs(chosen: Mapping[str, Mapping], root: Path = ROOT) -> list[Path]:
    """The shipped configs configs/camvid/<task>_<method>.yaml of the study's tasks, each its
    borrowed file's bases with the chosen values (nested keys) on top."""
    import yaml

    written = []
    for task in FRESH_TASKS:
        for method, choice in chosen.items():
            borrowed = root / "configs" / "camvid" / f"{task}_{method}_borrowed.yaml"
            # the borrowed file's bases and settings, the chosen dotted keys merged on top
            nested = nest_dotted({**yaml.safe_load(borrowed.read_text()),
                                  **dict(sorted(choice["params"].items()))})
            path = borrowed.with_name(f"{task}_{method}.yaml")
            path.write_text(
                f"# {method} on CamVid {task} at the values the tuning study chose for it "
                f"(tools/css_tuned.py:\n# trial {choice['index']} of its sweep on large-2s, "
                f"val all-mIoU {100 * choice['score']:.1f}; "
                "tools/results/css_tuned/results.md).\n"
                f"# Its authors' VOC values: {borrowed.name}.\n"
                + yaml.safe_dump(nested, sort_keys=False, default_flow_style=None))
            written.append(path)
    return written


def load_timings(work: Path) -> dict:
    """Seconds each phase and sweep took when it ran (kept across resumed runs)."""
    path = work / TIMINGS
    return json.loads(path.read_text()) if path.is_file() else {}


def save_timings(work: Path, timings: Mapping) -> None:
    """Write what load_timings reads."""
    (work / TIMINGS).write_text(json.dumps(timings, indent=2))


def run_search(args, shards: Mapping[str, Path], env: dict, timings: dict) -> dict:
    """Run (or resume) the sweeps that have not finished; the summaries by method."""
    sweeps = args.work / "sweeps"
    summaries = {m: read_sweep(sweeps / sweep_name(m)) for m in args.methods}
    todo = [j for j in sweep_jobs(args.methods, args.trials, shards, sweeps, args.smoke)
            if not sweep_finished(summaries[j.label], args.trials)]
    for job in todo:  # a finished sweep a job needs has nothing left to wait for
        if job.needs and job.needs not in {j.key for j in todo}:
            job.needs = None
    if todo:
        print(f"sweeps to run: {', '.join(j.label for j in todo)} ({args.trials} trials each, "
              f"{args.parallel} at a time); logs in {args.work / 'logs'}", flush=True)
        started = time.perf_counter()
        try:
            bench.run_jobs(todo, args.parallel, env, args.work / "logs")
        finally:  # a study cut short keeps the time it spent
            for job in (j for j in todo if j.wall_s is not None):
                timings.setdefault("sweeps", {})[job.label] = \
                    timings.get("sweeps", {}).get(job.label, 0.0) + job.wall_s
            timings["search_s"] = timings.get("search_s", 0.0) + time.perf_counter() - started
            save_timings(args.work, timings)
    summaries = {m: read_sweep(sweeps / sweep_name(m)) for m in args.methods}
    unfinished = [m for m, s in summaries.items() if not sweep_finished(s, args.trials)]
    if unfinished:
        raise SystemExit(f"sweeps without {args.trials} finished trials: {unfinished}; see "
                         f"{args.work / 'logs'}")
    return summaries


def fresh_jobs(methods: Sequence[str], seeds: Sequence[int], smoke: bool,
               shards: Mapping[str, Path], runs: Path, chosen: Mapping[str, Mapping]) -> list:
    """The fresh seeds' runs (css_benchmark's plan: the chosen values on each method's
    borrowed config, ft and joint beside them, each run then evaluated on the held-out
    drive), in the order the readings need them, so that a study cut short still answers
    large-2s: the step 0s, the tuned methods on large-2s, then on large-4s, then ft, then
    joint (evaluations start as soon as their run ends)."""
    plan_args = argparse.Namespace(
        seeds=list(seeds), tasks=list(FRESH_TASKS), ablation_task=None, smoke=smoke,
        launcher="local", joint=not smoke, methods=[*([] if smoke else ["ft"]), *methods])
    tuned = {m: overrides_of(c["params"]) for m, c in chosen.items()}

    def rank(job) -> int:
        if job.kind in ("eval", "step0"):
            return 0 if job.kind == "eval" else 1
        if job.kind == "joint":
            return 5
        return 4 if job.label == "ft" else 2 + FRESH_TASKS.index(job.task)

    return sorted(bench.plan(plan_args, shards, runs, tuned), key=rank)


def run_fresh(args, shards: Mapping[str, Path], chosen: Mapping[str, Mapping], env: dict,
              timings: dict) -> tuple[list[dict], list[bench.Job]]:
    """Run (or reuse) the fresh seeds' runs (fresh_jobs); the table rows and the run jobs."""
    runs, logs = args.work / "runs", args.work / "logs"
    jobs = fresh_jobs(args.methods, args.seeds, args.smoke, shards, runs, chosen)
    print(f"fresh seeds {args.seeds}: {sum(j.kind != 'eval' for j in jobs)} runs and their "
          f"held-out evaluations, {args.parallel} at a time; logs in {logs}", flush=True)
    started = time.perf_counter()
    try:
        bench.run_jobs(jobs, args.parallel, {**env, "WANDB_MODE": "disabled"}, logs)
    finally:  # a study cut short keeps the time it spent
        timings["fresh_s"] = timings.get("fresh_s", 0.0) + time.perf_counter() - started
        save_timings(args.work, timings)
    jobs = bench.read_outputs(jobs, runs, logs)
    old_names = {}
    for job in (j for j in jobs if j.kind == "step0"):
        old_names.setdefault(job.family, list(job.summary["steps"][-1]["per_class_iou"]))
    return bench.aggregate(jobs, old_names), jobs


def answers(rows: Sequence[Mapping], pairs: Sequence[Mapping], chosen: Mapping,
            turned: Sequence[str] = ()) -> list[str]:
    """The readings the study exists for: ICD against MiB and PLOP, tuned, on each task and
    eval set (all-mIoU, the paired rule); whether some ICD trial beat MiB's best in the
    search and which of ICD's weights it turned down (`turned`); whether tuned DKD learns its
    new classes."""
    out = []
    if "icd" in chosen and "mib" in chosen:
        icd, mib = chosen["icd"]["score"], chosen["mib"]["score"]
        out.append(f"Search (seed 100, val all-mIoU): best ICD trial {100 * icd:.1f}, best MiB "
                   f"trial {100 * mib:.1f}: "
                   + ("an ICD configuration beat tuned MiB." if icd > mib else
                      "no ICD configuration beat tuned MiB."))
    if turned:
        out.append("ICD's search turned down (chosen at the bottom of the range): "
                   + ", ".join(turned))
    for task in FRESH_TASKS:
        for other in ("mib", "plop"):
            for eval_set in bench.EVAL_SETS:
                p = next((p for p in pairs if p["task"] == task and p["b"] == other and
                          p["eval_set"] == eval_set and p["metric"] == "all" and
                          p["kind"] == "method"), None)
                if p is None:
                    continue
                word = {"higher": "above", "lower": "below"}.get(p["verdict"],
                                                                 "not separable from")
                spread = "-" if p["spread"] is None else f"{p['spread']:.1f}"
                diffs = ", ".join(f"{d:+.1f}" for d in p["diffs"])
                out.append(f"{task}, {bench.EVAL_SET_NAMES[eval_set]}: tuned ICD is {word} "
                           f"tuned {METHOD_NAMES[other]} on all-mIoU (mean {p['mean']:+.1f}, "
                           f"spread {spread}, per seed {diffs})")
    dkd = next((r for r in rows if r["kind"] == "method" and r["task"] == SEARCH_TASK
                and r["label"] == "dkd"), None)
    if dkd is not None and dkd["val"]["new"] is not None:
        new = dkd["val"]["new"]
        out.append(f"Tuned DKD on {SEARCH_TASK}: val new-class mIoU {new:.1f} "
                   + ("(learns its new classes: >= 20)" if new >= 20 else
                      "(below 20: it does not learn its new classes at this budget)"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--camvid", type=Path, default=ROOT.parent / "shared" / "data" / "camvid",
                   help="CamVid folder (train/, val/, trainannot/, valannot/, *.txt)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "css_tuned",
                   help="shards, sweeps, runs and logs (finished ones are reused)")
    p.add_argument("--out", type=Path, help="where results.md, results.json and the figures "
                   "go (default tools/results/css_tuned; with --smoke, the smoke folder)")
    p.add_argument("--methods", nargs="+", default=list(TUNED), choices=TUNED,
                   help="the methods tuned and compared")
    p.add_argument("--trials", type=int, default=12, help="trials of every method's sweep")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="the fresh seeds (the sweeps train at seed 100)")
    p.add_argument("--phase", choices=["all", "search"], default="all",
                   help="search: the sweeps and their choices only")
    p.add_argument("--parallel", type=int, default=2, help="sweeps or runs at a time (one "
                   "core each)")
    p.add_argument("--write-configs", action="store_true", help="write the chosen values "
                   "into the shipped configs/camvid/<task>_<method>.yaml of large-2s and "
                   "large-4s (bases and values of the borrowed files, the choice on top)")
    p.add_argument("--smoke", action="store_true", help="mib and icd, 2 trials, seed 0, tiny "
                   "budgets and data, no ft or joint: an end-to-end check")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.smoke:
        args.methods, args.trials = list(SMOKE_METHODS), SMOKE_TRIALS
        args.seeds = args.seeds[:1]
        args.work = args.work / "smoke"
    if args.out is None:
        args.out = args.work if args.smoke else ROOT / "tools" / "results" / "css_tuned"
    if 100 in args.seeds:
        p.error("seed 100 is the sweeps' seed; the fresh seeds must differ")
    if bench.camvid_missing(args.camvid):
        return 2
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    sets = bench.split_lists(args.camvid.resolve(), args.smoke)
    shards = bench.build_shards(args.camvid.resolve(), args.work, sets)
    env = bench.job_env()  # the sweeps log to W&B offline (the fresh runs do not)
    timings = load_timings(args.work)

    sweeps = run_search(args, shards, env, timings)
    chosen = {m: choose(s) for m, s in sweeps.items()}
    positions = {m: weight_positions(s, chosen[m]) for m, s in sweeps.items()}
    if args.write_configs:
        for path in write_configs(chosen):
            print(f"wrote {path.relative_to(ROOT)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    figures = [plot_search(s, chosen[m], args.out / f"search_{m}.png").name
               for m, s in sweeps.items()]
    rows, pairs, jobs = [], [], []
    if args.phase == "all":
        rows, jobs = run_fresh(args, shards, chosen, env, timings)
        pairs = bench.comparisons(rows, None)
        curves = per_step(rows, jobs, "large-4s")
        for task in FRESH_TASKS:
            if f := bench.plot_per_class(rows, task, args.out / f"per_class_iou_{task}.png"):
                figures.append(f.name)
        if f := plot_per_step(curves, "large-4s", args.out / "old_new_per_step_large-4s.png"):
            figures.append(f.name)
    device = f"CPU: {cpu_name()}, {os.cpu_count()} cores"
    command = "python tools/css_tuned.py " + " ".join(argv if argv is not None else sys.argv[1:])
    readings = answers(rows, pairs, chosen, turned_down(positions.get("icd", ())))
    meta = {"command": command.strip(), "date": dt.date.today().isoformat(), "device": device,
            "versions": bench.versions(), "phase": args.phase, "smoke": args.smoke,
            "trials_per_method": args.trials, "search_seed": 100, "search_task": SEARCH_TASK,
            "selection": "val all-class mIoU after the last step (drive 0016E5)",
            "fresh_seeds": args.seeds, "fresh_tasks": list(FRESH_TASKS),
            "heldout_drive": bench.HELDOUT_DRIVE, "train_images": len(sets["train"]),
            "parallel": args.parallel, "timings_s": timings, "figures": figures,
            "wandb_groups": {m: s["sweep"] for m, s in sweeps.items()}}
    (args.out / "results.json").write_text(json.dumps(
        {**meta, "sweeps": sweeps, "chosen": chosen, "positions": positions,
         "icd_turned_down": turned_down(positions.get("icd", ())),
         "readings": readings, "rows": rows, "paired": pairs,
         "per_step_large-4s": per_step(rows, jobs, "large-4s") if rows else {}},
        indent=2))
    hours = sum(v for k, v in timings.items() if k.endswith("_s")) / 3600
    md = (f"# Every method tuned for the same budget on CamVid "
          f"({'smoke check' if args.smoke else 'study'})\n\n"
          f"`{meta['command']}`: {hours:.2f} h measured ("
          + ", ".join(f"{k.removesuffix('_s')} {v / 60:.0f} min" for k, v in timings.items()
                      if k.endswith("_s"))
          + f") on {device}, " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
          + f", {args.parallel} at a time. Each of {', '.join(args.methods)}: {args.trials} "
          f"trials of its own space on {SEARCH_TASK} at seed 100, Optuna TPE (seed 0), its "
          "borrowed values first, chosen on val all-mIoU; the chosen values then run on fresh "
          f"seeds {args.seeds} on {' and '.join(FRESH_TASKS)}, scored on val and on the "
          f"held-out drive {bench.HELDOUT_DRIVE} (never seen by a sweep)"
          + (" - not in this file: `--phase search` stops after the choices" if not rows
             else "") + ".\n\n"
          "## Search\n\n" + search_markdown(sweeps, chosen, positions) + "\n## Chosen values\n\n"
          + "\n".join(f"- {m}: " + ", ".join(f"{k}={format_value(v)}"
                                             for k, v in c["params"].items())
                      + f" (trial {c['index']}, val all {100 * c['score']:.1f})"
                      for m, c in chosen.items()) + "\n")
    if rows:
        md += ("\n## Fresh seeds\n\n" + bench.format_tables(rows, None)
               + "".join(f"\n![{f}]({f})\n" for f in figures if not f.startswith("search_")))
    if readings:
        md += "\n## Readings\n\n" + "\n".join(f"- {r}" for r in readings) + "\n"
    (args.out / "results.md").write_text(md)
    print(md)
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

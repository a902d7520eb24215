"""What the schedule runner costs per incremental step, before and after a change, in one run.

For each code version (`--before REF`: that commit, checked out in a temporary git worktree;
"after": this working tree) and each task (the demo task 2-1 as 3 steps on its synthetic
data; CamVid 6-1, 6 steps, on ../shared/data/camvid), it runs `python -m icd_dist.run` twice
on a tiny budget (2 iterations a step), once stopped after step 0 and once to the end, and
reads the steps' training seconds from their metrics.json:

    first step  = wall(step 0 only) - training seconds of step 0: from the run's start to the
                  end of step 0 minus its training (Ray start, worker group, model, engine,
                  evaluation, results)
    per step    = (wall(all) - wall(step 0 only) - training seconds of steps 1..) / (steps - 1):
                  what each further step costs besides its training (with one worker group per
                  step: its start; with one per schedule: the step's setup, evaluation, results)

Both include each step's evaluation, which is the same for both versions, so their difference
is the runner's overhead saved. Versions and tasks are interleaved, so the machine's load hits
both alike. Prints a table and writes JSON (default tools/results/bench_runner_cpu.json).

    python tools/bench_runner.py --before 0194ddc [--tasks demo camvid-6-1] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from bench_common import cpu_name  # noqa: E402

TINY = ["optim.iterations=2", "optim.iterations_incremental=2", "logging.wandb=disabled",
        "run.keep_checkpoints=false"]
TASKS = {
    "demo": (["--config", "configs/demo.yaml", "task.name=2-1"], None),
    "camvid-6-1": (["--config", "configs/camvid/6-1_icd.yaml"], "camvid"),
}


def build_camvid(camvid: Path, out: Path, code: Path, env: dict) -> list[str]:
    """Shards of CamVid train and val under `out` (once); the overrides that point to them."""
    for split in ("train", "val"):
        if not (out / split / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "icd_dist.shards", "build", "--dataset",
                            "camvid", "--root", str(camvid), "--split", split, "--out",
                            str(out / split)], cwd=code, env=env, check=True,
                           capture_output=True)
    return [f"data.train_shards={out / 'train'}", f"data.eval_shards={out / 'val'}"]


def timed_run(code: Path, args: list[str], storage: Path, name: str, env: dict,
              last_step: int | None) -> tuple[float, list[dict]]:
    """Wall seconds of one `python -m icd_dist.run` and its steps' metrics."""
    cmd = [sys.executable, "-m", "icd_dist.run", *args, *TINY, f"run.storage_path={storage}",
           f"run.name={name}"]
    if last_step is not None:
        cmd += ["--last-step", str(last_step)]
    for attempt in (1, 2):  # a Ray that failed to start (another Ray stopped it) is retried
        shutil.rmtree(storage / name, ignore_errors=True)
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if not done.returncode:
            break
        if attempt == 2 or "Raylet" not in done.stderr:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        print(f"  Ray failed to start, once more: {' '.join(cmd[3:5])}", flush=True)
    summary = json.loads((storage / name / "summary.json").read_text())
    return wall, summary["steps"]


def measure(code: Path, task: str, extra: list[str], work: Path, env: dict) -> dict:
    """The first-step and per-step overheads of `task` with the code in `code`."""
    args, _ = TASKS[task]
    tag = f"{code.name}-{task}"
    one_wall, one = timed_run(code, [*args, *extra], work / "runs", f"{tag}-one", env, 0)
    all_wall, steps = timed_run(code, [*args, *extra], work / "runs", f"{tag}-all", env, None)
    later = sum(s["seconds"] for s in steps[1:])
    return {"steps": len(steps), "wall_step0_s": one_wall, "wall_all_s": all_wall,
            "train_s": [s["seconds"] for s in steps],
            "first_step_overhead_s": one_wall - one[0]["seconds"],
            "per_step_overhead_s": (all_wall - one_wall - later) / max(1, len(steps) - 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the commit to compare with (git ref)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--camvid", type=Path, default=ROOT.parent / "shared" / "data" / "camvid")
    p.add_argument("--out", type=Path, default=ROOT / "tools" / "results"
                   / "bench_runner_cpu.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        before = work / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before],
                       cwd=ROOT, check=True, capture_output=True)
        try:
            versions = {"before": before, "after": ROOT}
            rows = []
            for task in args.tasks:
                extra: list[str] = []
                for name, code in versions.items():
                    env = {**os.environ, "PYTHONPATH": str(code), "WANDB_MODE": "disabled"}
                    if TASKS[task][1] == "camvid":
                        extra = build_camvid(args.camvid, work / "camvid", code, env)
                    elif task == "demo":
                        extra = [f"data.train_shards={work / 'demo' / 'train'}",
                                 f"data.eval_shards={work / 'demo' / 'val'}"]
                    print(f"{task}: {name} ({code}) ...", flush=True)
                    rows.append({"task": task, "version": name,
                                 **measure(code, task, extra, work / name, env)})
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT,
                           capture_output=True)
            shutil.rmtree(before, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    device = f"CPU: {cpu_name()}, {os.cpu_count()} cores"
    print(f"\n{device}; before = {args.before}, after = {commit} + working tree; 2 iterations "
          "a step")
    print(f"{'task':11} {'version':7} {'steps':>5} {'first step s':>12} {'per step s':>10} "
          f"{'wall s':>7}")
    for r in rows:
        print(f"{r['task']:11} {r['version']:7} {r['steps']:5d} "
              f"{r['first_step_overhead_s']:12.1f} {r['per_step_overhead_s']:10.1f} "
              f"{r['wall_all_s']:7.1f}")
    import ray
    import torch

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python tools/bench_runner.py " + " ".join(argv or sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device, "before": args.before, "after": commit,
        "versions": {"torch": torch.__version__, "ray": ray.__version__},
        "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

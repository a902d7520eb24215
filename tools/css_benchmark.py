"""The CamVid continual-segmentation table and the ICD ablation, from one command.

Builds CamVid shards (train for training, val for evaluation), trains the shared step 0
once per seed, then runs ft, mib, plop and icd on CamVid 6-5 and 6-1 from that step 0, dkd
from its own step 0 (DKD trains step 0 with its own classifier and losses, once per seed for
both tasks), the joint upper bound, and the ICD ablation (internal only, external only,
statistic subsets, learned MSCA, tau) on one task, every run through `python -m icd_dist.run`
on one local Ray cluster, `--parallel` runs at a time. Writes results.md and results.json
(old / new / all mIoU, hIoU, wall time of every row, the commands, the device and versions)
to --out.

    python tools/css_benchmark.py                        # the README table (~45 min, 2 cores)
    python tools/css_benchmark.py --seeds 0 1 2          # mean and spread over three seeds
    python tools/css_benchmark.py --smoke --work /tmp/s  # a tiny end-to-end check (CI)
    python tools/css_benchmark.py --methods dkd --tasks 6-5 --ablation-task none --no-joint
                                                         # one method's rows alone

Budgets are iterations (configs/camvid/), so a re-run with the same seed trains the same
model; the wall times vary with the machine's load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import cpu_name  # noqa: E402

from icd_dist.train.metrics import harmonic_iou  # noqa: E402

METHODS = ("ft", "mib", "plop", "icd", "dkd")
# Methods whose step 0 is their own, not the shared CE one: its run-name prefix and label.
OWN_STEP0 = {"dkd": ("step0-dkd", "step 0 (DKD's own)")}
TASKS = ("6-5", "6-1")
# (row label, overrides on the icd config). The full method is the icd row of the main table.
ABLATION = (
    ("internal only", ["loss.icd.lambda_ext=0"]),
    ("external only", ["loss.icd.lambda_int=0"]),
    ("stats: channel (mean, std, max)", ["loss.icd.stats=[mean,std,max]"]),
    ("stats: spatial (spatial_mean, spatial_std)", ["loss.icd.stats=[spatial_mean,spatial_std]"]),
    ("MSCA learned", ["loss.icd.msca=learned"]),
    ("tau 0.5", ["loss.icd.tau=0.5"]),
    ("tau 2", ["loss.icd.tau=2.0"]),
    ("lambda_int x10 (10)", ["loss.icd.lambda_int=10"]),
    ("lambda_ext x10 (100)", ["loss.icd.lambda_ext=100"]),
)
# --smoke: one method pair on 6-5, a few iterations on a few images, tiny crops.
SMOKE_OVERRIDES = ["optim.iterations=3", "optim.iterations_incremental=2", "data.crop_size=64",
                   "data.eval_size=64", "optim.batch_size=4"]
SMOKE_IMAGES = (24, 8)  # train, val


@dataclass
class Job:
    """One `python -m icd_dist.run` invocation and what it produced."""

    key: str            # unique id, also the run name
    kind: str           # step0 | joint | method | ablation
    label: str          # the row label (method name or ablation variant)
    task: str           # "6-5", "6-1", "offline" or "step0"
    seed: int
    config: str
    overrides: list[str]
    extra_args: list[str] = field(default_factory=list)
    needs: str | None = None   # key of the job whose step 0 this one takes
    wall_s: float | None = None
    summary: dict | None = None

    def command(self, python: str = "python") -> list[str]:
        """The command line of this run."""
        return [python, "-m", "icd_dist.run", "--config", self.config, *self.overrides,
                *self.extra_args]


def build_shards(camvid: Path, work: Path, smoke: bool) -> tuple[Path, Path]:
    """CamVid train and val shards in work/shards (kept between runs of the tool)."""
    from icd_dist.shards import main as shards_main

    out = []
    for split, count in (("train", SMOKE_IMAGES[0]), ("val", SMOKE_IMAGES[1])):
        folder = work / "shards" / split
        args = ["build", "--dataset", "camvid", "--root", str(camvid), "--split", split,
                "--out", str(folder)]
        if smoke:
            lines = (camvid / f"{split}.txt").read_text().splitlines()[:count]
            listing = work / f"{split}_smoke.txt"
            listing.write_text("\n".join(lines) + "\n")
            args += ["--list", str(listing)]
        if not (folder / "manifest.json").is_file():
            print(f"building CamVid {split} shards in {folder}", flush=True)
            if shards_main(args) != 0:
                raise SystemExit(f"building the {split} shards failed")
        out.append(folder)
    return out[0], out[1]


def plan(args, train: Path, val: Path, runs: Path) -> list[Job]:
    """Every run of the table, step-0 jobs first."""
    common = [f"data.train_shards={train}", f"data.eval_shards={val}",
              f"run.storage_path={runs}", *(SMOKE_OVERRIDES if args.smoke else [])]
    jobs: list[Job] = []
    for seed in args.seeds:
        base = [*common, f"run.seed={seed}"]
        step0 = f"step0-s{seed}"
        if args.ablation_task or any(m not in OWN_STEP0 for m in args.methods):
            jobs.append(Job(step0, "step0", "step 0 (shared)", "step0", seed,
                            "configs/camvid/6-5_ft.yaml", [*base, f"run.name={step0}"],
                            ["--last-step", "0"]))
        own = {}  # method -> its own step-0 job's key
        for method in (m for m in args.methods if m in OWN_STEP0):
            prefix, label = OWN_STEP0[method]
            own[method] = f"{prefix}-s{seed}"
            jobs.append(Job(own[method], "step0", label, "step0", seed,
                            f"configs/camvid/6-5_{method}.yaml",
                            [*base, f"run.name={own[method]}"], ["--last-step", "0"]))
        if not args.smoke and getattr(args, "joint", True):
            jobs.append(Job(f"joint-s{seed}", "joint", "joint", "offline", seed,
                            "configs/camvid/joint.yaml", [*base, f"run.name=joint-s{seed}"]))
        for task in args.tasks:
            for method in args.methods:
                key = f"{task}-{method}-s{seed}"
                needs = own.get(method, step0)
                jobs.append(Job(key, "method", method, task, seed,
                                f"configs/camvid/{task}_{method}.yaml",
                                [*base, f"run.name={key}"],
                                ["--step0-from", str(runs / needs)], needs=needs))
        if args.ablation_task:
            for label, overrides in ABLATION:
                # named by its overrides: a changed variant never reuses an old run's folder
                slug = re.sub(r"[^a-z0-9]+", "-", " ".join(overrides).replace("loss.icd.", ""))
                key = f"{args.ablation_task}-icd-{slug.strip('-')}-s{seed}"
                jobs.append(Job(key, "ablation", label, args.ablation_task, seed,
                                f"configs/camvid/{args.ablation_task}_icd.yaml",
                                [*base, *overrides, f"run.name={key}"],
                                ["--step0-from", str(runs / step0)], needs=step0))
    # longest first once step 0 is there: 6-1 runs (five steps) before one-step runs
    order = {"step0": 0, "joint": 1}
    return sorted(jobs, key=lambda j: (order.get(j.kind, 2), j.task != "6-1"))


def start_ray(cpus: int, env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    """Start the local Ray head the runs attach to (on loopback, `cpus` CPUs, a fresh auth
    token in `env`, RAY_ADDRESS set there); the head's process and its temp folder. Its own
    temp folder keeps its address out of /tmp/ray, where a later `ray.init()` elsewhere would
    find it and try to attach; terminating the head stops this cluster and only this one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    ray_cli = str(Path(sys.executable).with_name("ray"))
    log.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix="icd_ray_")
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={port}", f"--num-cpus={cpus}", "--num-gpus=0",
                             f"--temp-dir={temp_dir}", "--include-dashboard=false",
                             "--disable-usage-stats"],
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    for _ in range(120):  # until the cluster answers (the status command returns 0)
        if head.poll() is not None:
            raise SystemExit(f"the Ray head did not start; see {log}")
        status = subprocess.run([ray_cli, "status", "--address", env["RAY_ADDRESS"]], env=env,
                                capture_output=True)
        if status.returncode == 0:
            return head, temp_dir
        time.sleep(1.0)
    stop_ray(head, temp_dir)
    raise SystemExit(f"the Ray head did not answer within 2 minutes; see {log}")


def stop_ray(head: subprocess.Popen, temp_dir: str) -> None:
    """Stop the head started by start_ray (and with it the cluster's processes)."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


def run_jobs(jobs: list[Job], parallel: int, env: dict, logs: Path) -> None:
    """Run the jobs, `parallel` at a time, each after the job it needs; stop everything at
    the first failure (its log's tail is printed)."""
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, done = list(jobs), {}, set()
    try:
        _run_all(pending, running, done, parallel, env, logs)
    finally:  # a failure, Ctrl-C or SIGTERM: no run is left behind
        for _, proc, log, _ in running.values():
            proc.kill()
            proc.wait()
            log.close()


def _run_all(pending: list[Job], running: dict, done: set, parallel: int, env: dict,
             logs: Path) -> None:
    started_all = time.perf_counter()
    while pending or running:
        for job in [j for j in pending if j.needs is None or j.needs in done]:
            if len(running) >= parallel:
                break
            pending.remove(job)
            log = open(logs / f"{job.key}.log", "w")  # noqa: SIM115 - closed when it ends
            proc = subprocess.Popen(job.command(sys.executable), cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            running[job.key] = (job, proc, log, time.perf_counter())
            print(f"[{_clock(started_all)}] started {job.key}", flush=True)
        time.sleep(1.0)
        for key, (job, proc, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[key]
            job.wall_s = time.perf_counter() - t0
            if proc.returncode != 0:
                tail = (logs / f"{key}.log").read_text().splitlines()[-40:]
                raise SystemExit(f"{key} failed (exit {proc.returncode}); the end of its log "
                                 f"({logs / (key + '.log')}):\n" + "\n".join(tail))
            done.add(key)
            left = len(pending) + len(running)
            print(f"[{_clock(started_all)}] finished {key} in {job.wall_s / 60:.1f} min "
                  f"({left} to go)", flush=True)


def _clock(start: float) -> str:
    s = int(time.perf_counter() - start)
    return f"{s // 60:3d}:{s % 60:02d}"


def _final(job: Job) -> dict:
    return job.summary["steps"][-1]


def scores(job: Job, old_names: list[str]) -> dict:
    """old / new / all mIoU and hIoU (percent) after the last step of `job`. For joint, old
    and new are its per-class IoUs split as the continual tasks split them."""
    last = _final(job)
    if job.kind == "joint":
        iou = last["per_class_iou"]
        old = [v for k, v in iou.items() if k in old_names and v is not None]
        new = [v for k, v in iou.items() if k not in old_names and v is not None]
        o = sum(old) / len(old) if old else None
        n = sum(new) / len(new) if new else None
        values = {"old": o, "new": n, "all": last["miou_all"], "hiou": harmonic_iou(o, n)}
    else:
        values = {"old": last["miou_old"], "new": last["miou_new"], "all": last["miou_all"],
                  "hiou": last["hiou"]}
    return {k: None if v is None else 100 * v for k, v in values.items()}


def trained_seconds(job: Job) -> float:
    """Seconds of training (steps' loops) the run itself did: a continual run's step 0 is
    the shared one, counted in the step-0 row."""
    steps = job.summary["steps"]
    return sum(s["seconds"] for s in steps if s["step"] > 0 or job.kind in ("step0", "joint"))


def aggregate(jobs: list[Job], old_names: list[str]) -> list[dict]:
    """One row per (kind, task, label): the mean and the spread (population std) over seeds
    of every score, the per-seed values, the mean wall time and the command of seed 0."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.kind, job.task, job.label), []).append(job)
    rows = []
    for (kind, task, label), group in groups.items():
        per_seed = [scores(j, old_names) for j in group]
        row = {"kind": kind, "task": task, "label": label,
               "seeds": [j.seed for j in group], "per_seed": per_seed,
               "wall_min": statistics.fmean(j.wall_s for j in group) / 60,
               "train_s": statistics.fmean(trained_seconds(j) for j in group),
               "command": " ".join(group[0].command())}
        for metric in ("old", "new", "all", "hiou"):
            values = [s[metric] for s in per_seed if s[metric] is not None]
            row[metric] = statistics.fmean(values) if values else None
            row[f"{metric}_std"] = statistics.pstdev(values) if len(values) > 1 else None
        rows.append(row)
    return rows


def _cell(row: dict, metric: str) -> str:
    value = row[metric]
    if value is None:
        return "-"
    spread = row[f"{metric}_std"]
    return f"{value:.1f}" if spread is None else f"{value:.1f} ± {spread:.1f}"


def format_tables(rows: list[dict], ablation_task: str | None) -> str:
    """The markdown of results.md's tables."""
    head = ("| {first} | old | new | all | hIoU | wall (min) |\n"
            "|---|---|---|---|---|---|\n")
    out = []
    for task in TASKS:
        body = [r for r in rows if r["task"] == task and r["kind"] == "method"]
        if not body:
            continue
        out.append(f"**CamVid {task}** (mIoU %, after the last step)\n\n"
                   + head.format(first="method"))
        for r in [*body, *[r for r in rows if r["kind"] == "joint"]]:
            out[-1] += (f"| {r['label']} | {_cell(r, 'old')} | {_cell(r, 'new')} | "
                        f"{_cell(r, 'all')} | {_cell(r, 'hiou')} | {r['wall_min']:.1f} |\n")
    for r in (r for r in rows if r["kind"] == "step0"):
        if r["label"] == "step 0 (shared)":
            out.append(f"Shared step 0 (background + 6 classes, trained once per seed and "
                       f"reused by every continual run of the CE-trained methods): mIoU "
                       f"{_cell(r, 'all')}, {r['wall_min']:.1f} min.\n")
        else:
            out.append(f"{r['label'][0].upper()}{r['label'][1:]} (trained once per seed for "
                       f"its rows): mIoU {_cell(r, 'all')}, {r['wall_min']:.1f} min.\n")
    abl = [r for r in rows if r["kind"] == "ablation"]
    if abl:
        full = [r for r in rows if r["kind"] == "method" and r["label"] == "icd"
                and r["task"] == ablation_task]
        out.append(f"**ICD ablation on CamVid {ablation_task}** (mIoU %, after the last "
                   "step)\n\n" + head.format(first="variant"))
        for r in [*({**f, "label": "full (int + ext, all stats, fixed MSCA, tau 1)"}
                    for f in full), *abl]:
            out[-1] += (f"| {r['label']} | {_cell(r, 'old')} | {_cell(r, 'new')} | "
                        f"{_cell(r, 'all')} | {_cell(r, 'hiou')} | {r['wall_min']:.1f} |\n")
    return "\n".join(out)


def versions() -> dict:
    """Versions of what the runs used."""
    from importlib.metadata import version

    return {"python": platform.python_version(),
            **{name: version(name) for name in ("torch", "ray", "deepspeed")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--camvid", type=Path, default=ROOT.parent / "shared" / "data" / "camvid",
                   help="CamVid folder (train/, val/, trainannot/, valannot/, *.txt)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "css_benchmark",
                   help="shards, run folders and logs (runs already finished there are "
                        "reused: use a new folder for an independent re-run)")
    p.add_argument("--out", type=Path, help="where results.md and results.json go (default: "
                   "tools/results/css_benchmark; with --smoke, the smoke folder of --work)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="run.seed of every run; "
                   "with several, each row is their mean ± population std")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="continual methods of the main table")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS,
                   help="CamVid tasks of the main table")
    p.add_argument("--ablation-task", default="6-5", choices=[*TASKS, "none"],
                   help="the task of the ICD ablation (none: no ablation); 6-5 by default, "
                        "which keeps the whole table within an hour on 2 cores")
    p.add_argument("--no-joint", dest="joint", action="store_false",
                   help="leave out the joint upper bound")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one core each)")
    p.add_argument("--smoke", action="store_true", help="ft and icd on 6-5 only, tiny "
                   "budget and data, no joint and no ablation: an end-to-end check")
    args = p.parse_args(argv)
    # SIGTERM ends the tool as Ctrl-C does: its runs and its Ray are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.smoke:
        args.methods, args.tasks, args.ablation_task = ["ft", "icd"], ["6-5"], "none"
        # its own shards and runs: a full table in the same folder must not reuse them
        args.work = args.work / "smoke"
    if args.out is None:  # a smoke check never overwrites the committed table
        args.out = args.work if args.smoke else ROOT / "tools" / "results" / "css_benchmark"
    args.ablation_task = None if args.ablation_task == "none" else args.ablation_task
    if args.ablation_task and "icd" not in args.methods:
        args.methods.append("icd")  # the ablation's reference row
    if not (args.camvid / "train.txt").is_file():
        print(f"error: no CamVid at {args.camvid} (need train.txt, val.txt and the images; "
              "see ../shared/data/camvid/README.md)", file=sys.stderr)
        return 2
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train, val = build_shards(args.camvid.resolve(), args.work, args.smoke)
    jobs = plan(args, train, val, args.work / "runs")
    print(f"{len(jobs)} runs, {args.parallel} at a time; logs in {args.work / 'logs'}",
          flush=True)

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    head, ray_temp = start_ray(args.parallel, env, args.work / "logs" / "ray_head.log")
    try:
        run_jobs(jobs, args.parallel, env, args.work / "logs")
    finally:
        stop_ray(head, ray_temp)
    for job in jobs:
        job.summary = json.loads((args.work / "runs" / job.key / "summary.json").read_text())
    old_names = list(_final(next(j for j in jobs if j.kind == "step0"))["per_class_iou"])
    rows = aggregate(jobs, old_names)
    total_min = (time.perf_counter() - started) / 60
    device = f"CPU: {cpu_name()}, {os.cpu_count()} cores"
    command = "python tools/css_benchmark.py " + " ".join(argv if argv is not None
                                                            else sys.argv[1:])
    tables = format_tables(rows, args.ablation_task)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command.strip(), "date": dt.date.today().isoformat(), "device": device,
            "versions": versions(), "total_min": total_min, "seeds": args.seeds,
            "parallel": args.parallel, "smoke": args.smoke}
    (args.out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (args.out / "results.md").write_text(
        f"# CamVid continual segmentation ({'smoke check' if args.smoke else 'benchmark'})\n\n"
        f"`{meta['command']}`: {total_min:.1f} min on {device}, "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + f", {args.parallel} runs at a time, seeds {args.seeds}. Every continual run starts "
        "from the same step 0; budgets in configs/camvid/.\n\n" + tables)
    print(tables)
    print(f"total {total_min:.1f} min; wrote {args.out / 'results.md'} and "
          f"{args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

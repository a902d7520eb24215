"""The CamVid continual-segmentation benchmark and the ICD ablation, from one command.

Main table: task large-2s (step 0: background, sky, building, road; step 1: pavement, tree,
car, classes that can be learned at CPU scale, so plasticity shows), every method (ft, mib,
plop, icd, dkd) and the joint upper bound, over seeds 0, 1 and 2. Each run is scored on two
evaluation sets: CamVid val (101 images, drive 0016E5) and a held-out training drive
(0006R0, 101 images, left out of training in every run of the tool). The table reports
mean ± population std over seeds, and the per-seed paired differences ICD minus each
baseline; an ordering is claimed only where the paired difference has the same sign on every
seed and its mean exceeds the larger of the two rows' spreads. The ICD ablation (on
large-2s) is paired with the full ICD row in the same way. Also: large-4s (the same classes,
one per step) and the natural-order 6-5 / 6-1 tasks (thin new classes) on request.

    python tools/css_benchmark.py                        # the README table (3 seeds)
    python tools/css_benchmark.py --seeds 0 --ablation-task none   # one seed, no ablation
    python tools/css_benchmark.py --tasks large-2s large-4s 6-5    # more tasks
    python tools/css_benchmark.py --smoke --work /tmp/s  # a tiny end-to-end check (CI)

Shared runs: one CE step 0 per seed and task family (large-2s and large-4s share theirs;
6-5 and 6-1 theirs), DKD's own step 0 likewise, one joint run per seed and family. Every run
goes through `python -m icd_dist.run`, `--parallel` at a time: in its own process
(`--launcher local`, the default: CamVid runs train one worker, and in-process they give the
weights of one Ray worker, bit for bit, without a worker group to start), or on one local Ray
cluster the tool starts and stops (`--launcher ray`).
Writes results.md, results.json (every score, per seed and eval set, the paired differences,
the commands, the device and versions) and per_class_iou_<task>.png to --out.

Budgets are iterations (configs/camvid/), so a re-run with the same seed trains the same
model; the wall times vary with the machine's load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import cpu_name  # noqa: E402

from icd_dist.methods import METHODS as REGISTRY  # noqa: E402
from icd_dist.train.metrics import harmonic_iou  # noqa: E402

# The continual methods of the registry, in its order (ft, mib, plop, icd, dkd).
METHODS = tuple(name for name, method in REGISTRY.items() if not method.offline)
REFERENCE = "icd"  # the paired differences are ICD minus each other method


@dataclass(frozen=True)
class Family:
    """Tasks that share one step 0 (and so one CE step-0 run, one DKD step-0 run and one
    joint run per seed)."""

    step0_task: str     # the task whose configs train the family's step 0
    joint_config: str
    step0_classes: str  # for the tables


FAMILIES = {
    "large": Family("large-2s", "configs/camvid/large-joint_joint.yaml",
                    "background, sky, building, road"),
    "natural": Family("6-5", "configs/camvid/joint.yaml",
                      "background, sky, building, pole, road, pavement, tree"),
}
TASK_FAMILY = {"large-2s": "large", "large-4s": "large", "6-5": "natural", "6-1": "natural"}
TASKS = tuple(TASK_FAMILY)
MAIN_TASKS = ("large-2s",)
# Methods whose step 0 is their own, not the shared CE one: its run-name prefix and label.
OWN_STEP0 = {name: (f"step0-{name}", f"step 0 ({name.upper()}'s own)")
             for name, method in REGISTRY.items() if method.trains_own_step0}
# (row label, overrides on the icd config). The full method is the icd row of the main table.
ABLATION = (
    ("internal only", ["loss.icd.lambda_ext=0"]),
    ("external only", ["loss.icd.lambda_int=0"]),
    ("MSCA learned", ["loss.icd.msca=learned"]),
)
# The second evaluation set: one training drive, left out of training in every run here.
HELDOUT_DRIVE = "0006R0"
EVAL_SETS = ("val", "heldout")
EVAL_SET_NAMES = {"val": "val (drive 0016E5)", "heldout": f"held-out drive {HELDOUT_DRIVE}"}
METRICS = ("old", "new", "all", "hiou")
# Targets of the main task (issue 18): joint new-class mIoU, step 0 on its classes, ft's old.
TARGETS = (("joint new-class mIoU", "joint", "new", ">=", 25.0),
           ("step-0 mIoU on its classes", "step 0 (shared)", "all", ">=", 60.0),
           ("ft old-class mIoU (it must forget)", "ft", "old", "<=", 10.0))
# --smoke: one method pair on large-2s, a few iterations on a few images, tiny crops.
SMOKE_OVERRIDES = ["optim.iterations=3", "optim.iterations_incremental=2", "data.crop_size=64",
                   "data.eval_size=64", "optim.batch_size=4"]
SMOKE_IMAGES = {"train": 24, "heldout": 8, "val": 8}


@dataclass
class Job:
    """One `python -m icd_dist.run` (or, kind "eval", `python -m icd_dist.evaluate` on the
    held-out set; kind "tune", `python -m icd_dist.tune`) invocation and what it produced."""

    key: str            # unique id, also the run name
    kind: str           # step0 | joint | method | ablation | eval | tune
    label: str          # the row label (method name or ablation variant)
    task: str           # the task ("large-2s", ...), "step0-<family>" or "joint-<family>"
    seed: int
    config: str
    overrides: list[str]
    extra_args: list[str] = field(default_factory=list)
    needs: str | None = None   # key of the job that must finish first (its step 0, its run)
    family: str = "large"
    wall_s: float | None = None
    summary: dict | None = None   # the run's summary.json
    heldout: dict | None = None   # its last step's metrics on the held-out set

    def command(self, python: str = "python") -> list[str]:
        """The command line of this job."""
        if self.kind == "eval":
            return [python, "-m", "icd_dist.evaluate", *self.extra_args]
        module = "icd_dist.tune" if self.kind == "tune" else "icd_dist.run"
        return [python, "-m", module, "--config", self.config, *self.overrides,
                *self.extra_args]


def camvid_missing(camvid: Path) -> bool:
    """Whether `camvid` lacks CamVid (then the reason is printed to stderr)."""
    if (camvid / "train.txt").is_file():
        return False
    print(f"error: no CamVid at {camvid} (need train.txt, val.txt and the images; see "
          "../shared/data/camvid/README.md)", file=sys.stderr)
    return True


def job_env(**extra: str) -> dict[str, str]:
    """The environment of the jobs: this checkout first on PYTHONPATH (its icd_dist, whatever
    is installed), DeepSpeed's CPU accelerator, and `extra`."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    return env


def split_lists(camvid: Path, smoke: bool) -> dict[str, list[str]]:
    """The sample lines ("IMAGE LABEL") of the three sets: train = CamVid train without drive
    HELDOUT_DRIVE, heldout = that drive, val = CamVid val."""
    train = (camvid / "train.txt").read_text().splitlines()
    out = {"train": [ln for ln in train if ln.strip() and f"/{HELDOUT_DRIVE}_" not in ln],
           "heldout": [ln for ln in train if f"/{HELDOUT_DRIVE}_" in ln],
           "val": [ln for ln in (camvid / "val.txt").read_text().splitlines() if ln.strip()]}
    if not out["heldout"]:
        raise SystemExit(f"no image of drive {HELDOUT_DRIVE} in {camvid / 'train.txt'}")
    if smoke:
        out = {name: lines[:SMOKE_IMAGES[name]] for name, lines in out.items()}
    return out


def build_shards(camvid: Path, work: Path, sets: dict[str, list[str]]) -> dict[str, Path]:
    """Shards of the `sets` of split_lists (train without the held-out drive, held-out, val)
    in work/shards (kept between runs of the tool); their folders by set name."""
    from icd_dist.shards import main as shards_main

    folders = {}
    for name, lines in sets.items():
        # the folder names the split: a full-train folder of an older tool is never reused
        folder = work / "shards" / {"train": f"train_minus_{HELDOUT_DRIVE}",
                                    "heldout": f"heldout_{HELDOUT_DRIVE}", "val": "val"}[name]
        listing = work / "shards" / f"{folder.name}.txt"
        if not (folder / "manifest.json").is_file():
            listing.parent.mkdir(parents=True, exist_ok=True)
            listing.write_text("\n".join(lines) + "\n")
            print(f"building CamVid {name} shards ({len(lines)} images) in {folder}",
                  flush=True)
            split = "val" if name == "val" else "train"
            if shards_main(["build", "--dataset", "camvid", "--root", str(camvid), "--split",
                            split, "--out", str(folder), "--list", str(listing)]) != 0:
                raise SystemExit(f"building the {name} shards failed")
        folders[name] = folder
    return folders


def _ablation_key(task: str, overrides: list[str], seed: int) -> str:
    # named by its overrides: a changed variant never reuses an old run's folder
    slug = re.sub(r"[^a-z0-9]+", "-", " ".join(overrides).replace("loss.icd.", ""))
    return f"{task}-icd-{slug.strip('-')}-s{seed}"


def tuned_key(overrides: Sequence[str]) -> str:
    """A short, stable name of a set of chosen values (a run's key carries it, so that other
    values never reuse its folder)."""
    return hashlib.sha256("\n".join(sorted(overrides)).encode()).hexdigest()[:8]


def method_config(task: str, method: str, borrowed: bool) -> str:
    """The config of `method` on `task`: configs/camvid/<task>_<method>.yaml (the shipped
    values: the tuning study's where it tuned them), or with `borrowed` its authors' VOC values
    (<task>_<method>_borrowed.yaml) where the study replaced them."""
    name = f"configs/camvid/{task}_{method}"
    return f"{name}_borrowed.yaml" if borrowed and (ROOT / f"{name}_borrowed.yaml").is_file() \
        else f"{name}.yaml"


def run_tag(task: str, method: str, config: str, chosen: Sequence[str]) -> str:
    """What a method run's key carries besides task, method and seed, so that runs of other
    values never share a folder (a finished run is reused by its key): the tuned_key of
    chosen values; where a borrowed config exists and its values differ from the shipped
    one's, "borrowed-" for it and "tuned-<hash of the shipped file>-" for the shipped one;
    nothing where no other values exist."""
    from icd_dist.config import load_config

    if chosen:
        return f"{tuned_key(chosen)}-"
    other = method_config(task, method, not config.endswith("_borrowed.yaml"))
    if other == config or load_config(ROOT / other) == load_config(ROOT / config):
        return ""
    if config.endswith("_borrowed.yaml"):
        return "borrowed-"
    return f"tuned-{tuned_key([(ROOT / config).read_text()])}-"


def plan(args, shards: dict[str, Path], runs: Path,
         tuned: Mapping[str, Sequence[str]] | None = None) -> list[Job]:
    """Every run of the benchmark, each followed by its held-out evaluation; in the order
    they are started (evaluations as soon as their run is done, step-0 runs first).
    `tuned`: per method, chosen values (key=value) that its continual runs take on top of
    its borrowed config (configs/camvid/<task>_<method>_borrowed.yaml); their keys name the
    values' tuned_key. args.settings "borrowed": every method on its borrowed config."""
    tuned = tuned or {}
    borrowed = getattr(args, "settings", "shipped") == "borrowed"
    common = [f"data.train_shards={shards['train']}", f"data.eval_shards={shards['val']}",
              f"run.storage_path={runs}", f"engine.launcher={args.launcher}",
              *(SMOKE_OVERRIDES if args.smoke else [])]
    tasks = list(args.tasks)
    if args.ablation_task and args.ablation_task not in tasks:
        tasks.append(args.ablation_task)
    families = list(dict.fromkeys(TASK_FAMILY[t] for t in tasks))
    jobs: list[Job] = []
    for seed in args.seeds:
        base = [*common, f"run.seed={seed}"]
        for fam in families:
            spec = FAMILIES[fam]
            fam_tasks = [t for t in args.tasks if TASK_FAMILY[t] == fam]
            step0 = f"step0-{fam}-s{seed}"
            ce_needed = (args.ablation_task and TASK_FAMILY[args.ablation_task] == fam) or (
                fam_tasks and any(m not in OWN_STEP0 for m in args.methods))
            if ce_needed:
                jobs.append(Job(step0, "step0", "step 0 (shared)", f"step0-{fam}", seed,
                                f"configs/camvid/{spec.step0_task}_ft.yaml",
                                [*base, f"run.name={step0}"], ["--last-step", "0"],
                                family=fam))
            own = {}  # method -> its own step-0 job's key
            for method in (m for m in args.methods if m in OWN_STEP0 and fam_tasks):
                prefix, label = OWN_STEP0[method]
                own[method] = f"{prefix}-{fam}-s{seed}"
                jobs.append(Job(own[method], "step0", label, f"step0-{fam}", seed,
                                f"configs/camvid/{spec.step0_task}_{method}.yaml",
                                [*base, f"run.name={own[method]}"], ["--last-step", "0"],
                                family=fam))
            if not args.smoke and getattr(args, "joint", True) and fam_tasks:
                key = f"joint-{fam}-s{seed}"
                jobs.append(Job(key, "joint", "joint", f"joint-{fam}", seed, spec.joint_config,
                                [*base, f"run.name={key}"], family=fam))
            for task in fam_tasks:
                for method in args.methods:
                    chosen = list(tuned.get(method, ()))
                    config = method_config(task, method, borrowed or method in tuned)
                    key = f"{task}-{method}-{run_tag(task, method, config, chosen)}s{seed}"
                    needs = own.get(method, step0)
                    jobs.append(Job(key, "method", method, task, seed, config,
                                    [*base, *chosen, f"run.name={key}"],
                                    ["--step0-from", str(runs / needs)], needs=needs,
                                    family=fam))
            if args.ablation_task and TASK_FAMILY[args.ablation_task] == fam:
                for label, overrides in ABLATION:
                    key = _ablation_key(args.ablation_task, overrides, seed)
                    jobs.append(Job(key, "ablation", label, args.ablation_task, seed,
                                    method_config(args.ablation_task, "icd", borrowed),
                                    [*base, *overrides, f"run.name={key}"],
                                    ["--step0-from", str(runs / step0)], needs=step0,
                                    family=fam))
    evals = [Job(f"{j.key}-heldout", "eval", j.label, j.task, j.seed, "", [],
                 ["--run", str(runs / j.key), "--data", str(shards["heldout"]), "--json"],
                 needs=j.key, family=j.family) for j in jobs]
    # evaluations first (started the moment their run ends), then step 0, joint, and the
    # longest continual runs (more steps) before the one-step ones
    order = {"eval": 0, "step0": 1, "joint": 2}
    return sorted([*jobs, *evals], key=lambda j: (order.get(j.kind, 3), j.task not in
                                                  ("large-4s", "6-1")))


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


def read_outputs(jobs: list[Job], runs: Path, logs: Path) -> list[Job]:
    """Attach every run's summary.json and its held-out metrics (the JSON line its eval job
    printed); the run jobs, without the eval jobs."""
    by_key = {j.key: j for j in jobs}
    for job in jobs:
        if job.kind == "eval":
            lines = [ln for ln in (logs / f"{job.key}.log").read_text().splitlines()
                     if ln.startswith("{")]
            if not lines:
                raise SystemExit(f"{job.key}: no JSON in {logs / (job.key + '.log')}")
            by_key[job.needs].heldout = json.loads(lines[-1])
        else:
            job.summary = json.loads((runs / job.key / "summary.json").read_text())
    return [j for j in jobs if j.kind != "eval"]


def _last(job: Job, eval_set: str) -> dict:
    return job.summary["steps"][-1] if eval_set == "val" else job.heldout


def scores(job: Job, old_names: list[str], eval_set: str = "val") -> dict:
    """old / new / all mIoU and hIoU (percent) after the last step of `job`, on `eval_set`
    (val: the run's own evaluation; heldout: the held-out drive). For joint, old and new are
    its per-class IoUs split as the continual tasks split them (`old_names`: the step-0
    classes)."""
    last = _last(job, eval_set)
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


def _spread_stats(per_seed: list[dict]) -> dict:
    out = {}
    for metric in METRICS:
        values = [s[metric] for s in per_seed if s[metric] is not None]
        out[metric] = statistics.fmean(values) if values else None
        out[f"{metric}_std"] = statistics.pstdev(values) if len(values) > 1 else None
    return out


def _per_class(jobs: list[Job], eval_set: str) -> dict:
    names = list(_last(jobs[0], eval_set)["per_class_iou"])
    out = {}
    for name in names:
        values = [_last(j, eval_set)["per_class_iou"].get(name) for j in jobs]
        values = [100 * v for v in values if v is not None]
        out[name] = ({"mean": statistics.fmean(values),
                      "std": statistics.pstdev(values) if len(values) > 1 else None}
                     if values else None)
    return out


def aggregate(jobs: list[Job], old_names: dict[str, list[str]]) -> list[dict]:
    """One row per (kind, task, label): for each eval set (val; heldout where the job has
    held-out metrics) the mean and the spread (population std) over seeds of every score,
    the per-seed values and the per-class IoU; the mean wall time and the command of the
    first seed. `old_names`: each family's step-0 classes."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.kind, job.task, job.label), []).append(job)
    rows = []
    for (kind, task, label), group in groups.items():
        group = sorted(group, key=lambda j: j.seed)
        names = old_names[group[0].family]
        row = {"kind": kind, "task": task, "label": label, "family": group[0].family,
               "seeds": [j.seed for j in group],
               "wall_min": statistics.fmean(j.wall_s for j in group) / 60,
               "train_s": statistics.fmean(trained_seconds(j) for j in group),
               "command": " ".join(group[0].command())}
        for eval_set in EVAL_SETS:
            if eval_set == "heldout" and any(j.heldout is None for j in group):
                row[eval_set] = None
                continue
            per_seed = [scores(j, names, eval_set) for j in group]
            row[eval_set] = {"per_seed": per_seed, **_spread_stats(per_seed),
                             "per_class": _per_class(group, eval_set)}
        rows.append(row)
    return rows


def verdict(diffs: list[float], spread: float | None) -> str:
    """The reading of one paired difference (A minus B per seed): "higher" (A above B) or
    "lower" only when the difference has the same sign on every seed and its mean exceeds
    the spread (the larger of the two rows' population stds over seeds); otherwise
    "not settled" (with one seed there is no spread: never settled)."""
    if len(diffs) < 2 or spread is None:
        return "not settled (one seed)"
    mean = statistics.fmean(diffs)
    if all(d > 0 for d in diffs) and mean > spread:
        return "higher"
    if all(d < 0 for d in diffs) and -mean > spread:
        return "lower"
    return "not settled"


def paired(row_a: dict, row_b: dict, eval_set: str, metric: str) -> dict | None:
    """Row A minus row B on one metric and eval set, seed by seed (the seeds both have),
    with its mean, the spread and the verdict; None where either has no value."""
    if row_a.get(eval_set) is None or row_b.get(eval_set) is None:
        return None
    a = dict(zip(row_a["seeds"], (s[metric] for s in row_a[eval_set]["per_seed"]), strict=True))
    b = dict(zip(row_b["seeds"], (s[metric] for s in row_b[eval_set]["per_seed"]), strict=True))
    seeds = [s for s in a if s in b and a[s] is not None and b[s] is not None]
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    stds = [row[eval_set][f"{metric}_std"] for row in (row_a, row_b)]
    spread = None if None in stds else max(stds)
    return {"a": row_a["label"], "b": row_b["label"], "task": row_a["task"],
            "eval_set": eval_set, "metric": metric, "seeds": seeds, "diffs": diffs,
            "mean": statistics.fmean(diffs), "spread": spread,
            "verdict": verdict(diffs, spread)}


def comparisons(rows: list[dict], ablation_task: str | None) -> list[dict]:
    """Every paired difference the benchmark reads: ICD minus each other method of each task,
    each ablation variant minus the full ICD, on every metric and both eval sets."""
    out = []
    for task in TASKS:
        methods = {r["label"]: r for r in rows if r["kind"] == "method" and r["task"] == task}
        if REFERENCE not in methods:
            continue
        pairs = [(methods[REFERENCE], r) for label, r in methods.items() if label != REFERENCE]
        if task == ablation_task:
            pairs += [(r, methods[REFERENCE]) for r in rows
                      if r["kind"] == "ablation" and r["task"] == task]
        for a, b in pairs:
            for eval_set in EVAL_SETS:
                for metric in METRICS:
                    p = paired(a, b, eval_set, metric)
                    if p is not None:
                        out.append({**p, "kind": "ablation" if a["kind"] == "ablation"
                                    else "method"})
    return out


def disagreements(pairs: list[dict]) -> list[dict]:
    """The comparisons whose verdict on val differs from the one on the held-out drive."""
    by = {}
    for p in pairs:
        by.setdefault((p["task"], p["a"], p["b"], p["metric"]), {})[p["eval_set"]] = p
    return [{"task": t, "a": a, "b": b, "metric": m, "val": d["val"]["verdict"],
             "heldout": d["heldout"]["verdict"]}
            for (t, a, b, m), d in by.items()
            if "val" in d and "heldout" in d and d["val"]["verdict"] != d["heldout"]["verdict"]]


def check_targets(rows: list[dict], task: str) -> list[dict]:
    """Issue 18's targets on the val set for `task`'s family: each with its measured mean."""
    fam = TASK_FAMILY[task]
    out = []
    for name, label, metric, op, bound in TARGETS:
        row = next((r for r in rows if r["label"] == label and r["family"] == fam and
                    r["task"] in (task, f"step0-{fam}", f"joint-{fam}")), None)
        value = None if row is None or row["val"] is None else row["val"][metric]
        ok = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append({"target": f"{name} {op} {bound:g}", "value": value, "met": ok})
    return out


def _cell(stats: dict | None, metric: str) -> str:
    if stats is None or stats[metric] is None:
        return "-"
    spread = stats[f"{metric}_std"]
    return f"{stats[metric]:.1f}" if spread is None else f"{stats[metric]:.1f} ± {spread:.1f}"


def _task_title(task: str) -> str:
    fam = FAMILIES[TASK_FAMILY[task]]
    return f"CamVid {task} (step 0: {fam.step0_classes})"


TABLE_HEAD = ("| {first} | val old | val new | val all | val hIoU | held-out old | "
              "held-out new | held-out all | held-out hIoU | wall (min) |\n"
              "|---|---|---|---|---|---|---|---|---|---|\n")


def _table_line(r: dict, label: str | None = None) -> str:
    cells = [_cell(r[e], m) for e in EVAL_SETS for m in METRICS]
    return f"| {label or r['label']} | " + " | ".join(cells) + f" | {r['wall_min']:.1f} |\n"


def _pairs_table(pairs: list[dict], title: str) -> str:
    if not pairs:
        return ""
    seeds = pairs[0]["seeds"]
    out = (f"{title}\n\n| A minus B | eval set | metric | "
           + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread | reading |\n"
           + "|---" * (6 + len(seeds)) + "|\n")
    for p in pairs:
        diffs = dict(zip(p["seeds"], p["diffs"], strict=True))
        cells = " | ".join(f"{diffs[s]:+.1f}" if s in diffs else "-" for s in seeds)
        spread = "-" if p["spread"] is None else f"{p['spread']:.1f}"
        out += (f"| {p['a']} - {p['b']} | {EVAL_SET_NAMES[p['eval_set']]} | {p['metric']} | "
                f"{cells} | {p['mean']:+.1f} | {spread} | {p['verdict']} |\n")
    return out


def format_tables(rows: list[dict], ablation_task: str | None) -> str:
    """The markdown of results.md's tables: per task the methods and joint on both eval
    sets, the paired differences (ICD minus each method), the shared step 0s, the targets;
    then the ablation and its paired differences."""
    pairs = comparisons(rows, ablation_task)
    out = []
    for task in TASKS:
        body = [r for r in rows if r["task"] == task and r["kind"] == "method"]
        if not body:
            continue
        fam = TASK_FAMILY[task]
        out.append(f"**{_task_title(task)}** (mIoU %, after the last step, mean ± std over "
                   "seeds)\n\n" + TABLE_HEAD.format(first="method")
                   + "".join(_table_line(r) for r in body)
                   + "".join(_table_line(r) for r in rows
                             if r["kind"] == "joint" and r["family"] == fam))
        for r in (r for r in rows if r["kind"] == "step0" and r["family"] == fam):
            out[-1] += _table_line(r, r["label"])
        if task in MAIN_TASKS:
            lines = [f"- {t['target']}: "
                     + ("not measured" if t["value"] is None else
                        f"{t['value']:.1f} ({'met' if t['met'] else 'NOT met'})")
                     for t in check_targets(rows, task)]
            out.append(f"Targets on val ({task}):\n" + "\n".join(lines) + "\n")
        out.append(_pairs_table([p for p in pairs if p["task"] == task and
                                 p["kind"] == "method"],
                                f"**Paired differences on {task}** (percentage points, per "
                                "seed; reading: higher/lower only with the same sign on "
                                "every seed and a mean beyond the spread, the larger std of "
                                "the two rows)"))
    abl = [r for r in rows if r["kind"] == "ablation"]
    if abl:
        full = [r for r in rows if r["kind"] == "method" and r["label"] == REFERENCE
                and r["task"] == ablation_task]
        out.append(f"**ICD ablation on {_task_title(ablation_task)}** (mIoU %, after the last "
                   "step)\n\n" + TABLE_HEAD.format(first="variant")
                   + "".join(_table_line(r, "full (int + ext, all stats, fixed MSCA, tau 1)")
                             for r in full)
                   + "".join(_table_line(r) for r in abl))
        out.append(_pairs_table([p for p in pairs if p["kind"] == "ablation"],
                                "**Ablation: each variant minus the full ICD** (same rule)"))
    dis = disagreements(pairs)
    if dis:
        out.append("**Where val and the held-out drive disagree** (the reading differs):\n\n"
                   + "\n".join(f"- {d['task']}: {d['a']} - {d['b']}, {d['metric']}: val "
                               f"{d['val']}, held-out {d['heldout']}" for d in dis) + "\n")
    return "\n".join(o for o in out if o)


def plot_per_class(rows: list[dict], task: str, path: Path) -> Path | None:
    """A figure of per-class IoU (mean over seeds, std as error bars) per method and joint
    on `task`, one panel per eval set; None when the task has no method rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fam = TASK_FAMILY[task]
    body = [r for r in rows if r["kind"] == "method" and r["task"] == task]
    body += [r for r in rows if r["kind"] == "joint" and r["family"] == fam]
    if not body:
        return None
    eval_sets = [e for e in EVAL_SETS if all(r[e] is not None for r in body)]
    fig, axes = plt.subplots(len(eval_sets), 1, figsize=(11, 3.6 * len(eval_sets)),
                             squeeze=False)
    for ax, eval_set in zip(axes[:, 0], eval_sets, strict=True):
        classes = list(body[-1][eval_set]["per_class"])  # joint (or the last) sees them all
        width = 0.8 / len(body)
        for i, r in enumerate(body):
            pc = r[eval_set]["per_class"]
            means = [(pc.get(c) or {}).get("mean", 0.0) for c in classes]
            stds = [(pc.get(c) or {}).get("std") or 0.0 for c in classes]
            ax.bar([k + (i - (len(body) - 1) / 2) * width for k in range(len(classes))],
                   means, width, yerr=stds, label=r["label"], capsize=2)
        ax.set_xticks(range(len(classes)), classes)
        ax.set_ylabel("IoU %")
        ax.set_ylim(0, 100)
        ax.set_title(f"{task}: {EVAL_SET_NAMES[eval_set]}")
        ax.legend(ncol=len(body), fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


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
    p.add_argument("--out", type=Path, help="where results.md, results.json and the figures "
                   "go (default: tools/results/css_benchmark; with --smoke, the smoke folder "
                   "of --work)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="run.seed of every run; each row is their mean ± population std")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="continual methods of the main table")
    p.add_argument("--tasks", nargs="+", default=list(MAIN_TASKS), choices=TASKS,
                   help="CamVid tasks (default: large-2s, the main table)")
    p.add_argument("--ablation-task", default="large-2s", choices=[*TASKS, "none"],
                   help="the task of the ICD ablation (none: no ablation)")
    p.add_argument("--no-joint", dest="joint", action="store_false",
                   help="leave out the joint upper bound")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one core each)")
    p.add_argument("--launcher", choices=["local", "ray"], default="local",
                   help="engine.launcher of every run: local = each run in its own process "
                        "(no Ray), ray = on one local Ray cluster the tool starts")
    p.add_argument("--settings", choices=["shipped", "borrowed"], default="shipped",
                   help="the methods' values: shipped (configs/camvid/<task>_<method>.yaml, "
                        "tuned by tools/css_tuned.py on the large tasks) or borrowed (their "
                        "authors' VOC values, <task>_<method>_borrowed.yaml where they differ)")
    p.add_argument("--smoke", action="store_true", help="ft and icd on large-2s only, tiny "
                   "budget and data, no joint and no ablation: an end-to-end check")
    args = p.parse_args(argv)
    # SIGTERM ends the tool as Ctrl-C does: its runs and its Ray are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.smoke:
        args.methods, args.tasks, args.ablation_task = ["ft", "icd"], ["large-2s"], "none"
        # its own shards and runs: a full table in the same folder must not reuse them
        args.work = args.work / "smoke"
    if args.out is None:  # a smoke check never overwrites the committed table
        args.out = args.work if args.smoke else ROOT / "tools" / "results" / "css_benchmark"
    args.ablation_task = None if args.ablation_task == "none" else args.ablation_task
    if args.ablation_task and "icd" not in args.methods:
        args.methods.append("icd")  # the ablation's reference row
    if args.ablation_task and args.ablation_task not in args.tasks:
        args.tasks.append(args.ablation_task)  # the full ICD row it is paired with
    if camvid_missing(args.camvid):
        return 2
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sets = split_lists(args.camvid.resolve(), args.smoke)
    shards = build_shards(args.camvid.resolve(), args.work, sets)
    runs, logs = args.work / "runs", args.work / "logs"
    jobs = plan(args, shards, runs)
    print(f"{sum(j.kind != 'eval' for j in jobs)} runs and their held-out evaluations, "
          f"{args.parallel} at a time; logs in {logs}", flush=True)

    env = job_env(WANDB_MODE="disabled")
    head, ray_temp = start_ray(args.parallel, env, logs / "ray_head.log") \
        if args.launcher == "ray" else (None, None)
    try:
        run_jobs(jobs, args.parallel, env, logs)
    finally:
        if head is not None:
            stop_ray(head, ray_temp)
    jobs = read_outputs(jobs, runs, logs)
    old_names = {}
    for job in (j for j in jobs if j.kind == "step0"):
        old_names.setdefault(job.family, list(job.summary["steps"][-1]["per_class_iou"]))
    rows = aggregate(jobs, old_names)
    total_min = (time.perf_counter() - started) / 60
    device = f"CPU: {cpu_name()}, {os.cpu_count()} cores"
    command = "python tools/css_benchmark.py " + " ".join(argv if argv is not None
                                                            else sys.argv[1:])
    tables = format_tables(rows, args.ablation_task)
    args.out.mkdir(parents=True, exist_ok=True)
    figures = [f for task in TASKS if task in args.tasks
               if (f := plot_per_class(rows, task, args.out / f"per_class_iou_{task}.png"))]
    meta = {"command": command.strip(), "date": dt.date.today().isoformat(), "device": device,
            "versions": versions(), "total_min": total_min, "seeds": args.seeds,
            "parallel": args.parallel, "launcher": args.launcher, "smoke": args.smoke,
            "eval_sets": {name: {"description": EVAL_SET_NAMES.get(name, name),
                                 "images": len(sets[name])} for name in EVAL_SETS},
            "train_images": len(sets["train"]), "heldout_drive": HELDOUT_DRIVE,
            "figures": [f.name for f in figures]}
    pairs = comparisons(rows, args.ablation_task)
    (args.out / "results.json").write_text(json.dumps(
        {**meta, "rows": rows, "paired": pairs, "disagreements": disagreements(pairs),
         "targets": {t: check_targets(rows, t) for t in args.tasks if t in MAIN_TASKS}},
        indent=2))
    (args.out / "results.md").write_text(
        f"# CamVid continual segmentation ({'smoke check' if args.smoke else 'benchmark'})\n\n"
        f"`{meta['command']}`: {total_min:.1f} min on {device}, "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + f", {args.parallel} runs at a time, seeds {args.seeds}. Trained on CamVid train "
        f"without drive {HELDOUT_DRIVE} ({len(sets['train'])} images); every run scored on "
        f"val ({len(sets['val'])} images, drive 0016E5) and on the held-out drive "
        f"{HELDOUT_DRIVE} ({len(sets['heldout'])} images). Every continual run of a task "
        "family starts from its seed's shared step 0; budgets in configs/camvid/.\n\n"
        + tables + "".join(f"\n![per-class IoU]({f.name})\n" for f in figures))
    print(tables)
    print(f"total {total_min:.1f} min; wrote {args.out / 'results.md'} and "
          f"{args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

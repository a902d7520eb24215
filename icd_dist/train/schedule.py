"""The schedule driver: one Ray Train fit for all the steps still to train.

    before Ray starts: the steps' selections (a StepJob per step to train), and their shards
    checked against the manifests (sizes and sha256; data.verify=false: sizes only);
    one fit (train/launcher.py): the workers loop over the steps (step_worker.run_plan),
    rank 0 handing each step's teacher (the model of t-1) to the others through the object
    store; engine.launcher=local runs that loop in this process instead;
    meanwhile, for each step in order: print rank 0's progress lines as they come; when its
    DONE marker appears, read its metrics.json, print its tables, delete its epoch
    checkpoints (unless run.keep_checkpoints=true);
    then: summary.json (with the number of worker groups started), plots, the resolved config
    beside them, the run folder's size.

Everything printed also goes to the run folder's run.log (console.RunLog), with the traceback
of a failed step, which the console shows as one line. `ray.init()` attaches to the cluster
in RAY_ADDRESS (as under `ray job submit`) and starts a local one otherwise (ray_session).
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable
from pathlib import Path

from icd_dist.config import Config, ConfigError, config_to_dict, dump_config
from icd_dist.css.classes import format_class_ids
from icd_dist.css.tasks import Task, task_from_config
from icd_dist.data import shard_files
from icd_dist.data.errors import BadShardError
from icd_dist.data.inspect import eval_selected_keys, manifest_spec, selected_keys
from icd_dist.data.manifest import MANIFEST_NAME, Manifest, load_manifest
from icd_dist.data.synthetic import build_synthetic
from icd_dist.data.verify import check_run_shards
from icd_dist.methods import build_method
from icd_dist.models.pretrained import check_pretrained
from icd_dist.train.checkpoint import EpochCheckpoints
from icd_dist.train.console import RunLog, step_failure
from icd_dist.train.launcher import FitThread, fit_in_process, fit_with_ray
from icd_dist.train.node_watch import NodeLossWatch
from icd_dist.train.plan import FAILURE_ENV, SchedulePlan, StepJob
from icd_dist.train.progress import ProgressFollower
from icd_dist.train.ray_session import describe_ray, init_ray
from icd_dist.train.report import (
    format_bad_samples,
    format_class_table,
    format_reading,
    format_step_result,
    format_summary_table,
    write_plots,
)
from icd_dist.train.run_folder import SUMMARY, RunFolder, format_bytes
from icd_dist.train.step0 import check_step0_source, step0_identity
from icd_dist.train.step_worker import sees_gpu
from icd_dist.train.storage import Storage
from icd_dist.train.teacher_board import make_board

Log = Callable[[str], None]
POLL_S = 1.0  # how often the driver looks for the current step's DONE marker


def run_name(cfg: Config, task_name: str) -> str:
    """run.name, or "{dataset}-{task}-{method}-{time}"."""
    if cfg.run.name:
        return cfg.run.name
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.data.dataset}-{task_name}-{cfg.method.name}-{stamp}"


def prepare_shards(cfg: Config, log: Log) -> tuple[str, str]:
    """(train, eval) shard folders; the synthetic dataset is built on first use."""
    train, evals = cfg.data.train_shards, cfg.data.eval_shards
    if not train or not evals:
        raise ConfigError("data.train_shards", "needs data.train_shards and data.eval_shards "
                          "(folders built by `python -m icd_dist.shards build`)")
    if cfg.data.dataset == "synthetic":
        s = cfg.data.synthetic
        for folder, num, seed in ((train, s.num_train, s.seed), (evals, s.num_eval, s.seed + 1)):
            if not shard_files.is_remote(folder) and not (Path(folder) / MANIFEST_NAME).is_file():
                log(f"building the synthetic dataset in {folder} ({num} samples)")
                build_synthetic(folder, num, s.classes, (s.height, s.width), seed=seed,
                                progress=False)
    for folder in (train, evals):
        if not shard_files.exists(shard_files.join(folder, MANIFEST_NAME)):
            raise FileNotFoundError(f"no shards in {folder}: build them with `python -m "
                                    "icd_dist.shards build ...` (see the README)")
    # workers run in other directories: hand them absolute paths (URIs stay as they are)
    return tuple(f if shard_files.is_remote(f) else str(Path(f).resolve())
                 for f in (train, evals))


def use_gpu(cfg: Config) -> bool:
    """Whether the step workers get GPUs: engine.device, or auto = the cluster has some."""
    import ray

    if cfg.engine.device == "cuda":
        return True
    if cfg.engine.device == "cpu":
        return False
    return ray.cluster_resources().get("GPU", 0) > 0


def fit_plan(plan: SchedulePlan, run: RunFolder, cfg: Config, gpu: bool) -> None:
    """Train every step of `plan` in one Ray Train fit (blocks until it ends)."""
    fit_with_ray(plan, run, cfg, gpu)


StepCallback = Callable[[int, dict], None]


def run_schedule(cfg: Config, log: Log | None = None, on_step: StepCallback | None = None,
                 step0_from: str | None = None, last_step: int | None = None) -> dict:
    """Train every step of the configured task (skipping finished ones); returns the summary
    (also written as summary.json in the run folder).

    log(message) receives every console line (default: printed on stderr); run.log in the
    run folder records them too. on_step(step, metrics) is called after every step, finished
    or skipped, the last one after summary.json is written. step0_from is a run folder (path
    or URI) whose finished step 0 this run takes instead of training its own (a sweep's
    shared step 0). last_step stops the schedule after that step. Bad shards (BadShardError)
    stop it before Ray starts; a failed step raises console.StepFailedError (one line)."""
    import ray

    run_log = RunLog(log)
    local = cfg.engine.launcher == "local"
    check_pretrained(cfg)  # VOC/ADE20K without ImageNet weights stop before anything starts
    train_dir, eval_dir = prepare_shards(cfg, run_log)
    train_manifest, eval_manifest = load_manifest(train_dir), load_manifest(eval_dir)
    task: Task = task_from_config(cfg, manifest_spec(train_manifest))
    for step in range(task.num_steps):  # method/loss/task mismatches fail here, not in workers
        build_method(cfg, task, step)
    name = run_name(cfg, task.name)
    run = RunFolder(Storage(cfg.run.storage_path).child(name))
    final = task.num_steps - 1 if last_step is None else min(last_step, task.num_steps - 1)
    to_train = [t for t in range(final + 1) if not run.is_done(t)
                and not (t == 0 and step0_from)]
    selections = {t: step_selection(cfg, task, t, train_manifest, eval_manifest, train_dir,
                                    eval_dir) for t in to_train}
    train_keys = [k for keys, _ in selections.values() for k in keys]
    eval_keys = [k for _, keys in selections.values() for k in keys]
    check_shards(cfg, [(train_dir, train_manifest, train_keys),
                       (eval_dir, eval_manifest, eval_keys)], run_log)
    step0_pending = not run.is_done(0)
    source = RunFolder(step0_from) if step0_from and step0_pending else None
    trained_apart: list[str] = []
    if step0_pending:
        keys0 = selections[0][0] if 0 in selections else selected_keys(train_manifest, task, 0)
        identity = step0_identity(cfg, task, keys0)
        if source is not None:  # before the run folder or Ray: a refusal changes nothing
            trained_apart = check_step0_source(cfg, task, source, identity)
    run.write_config(dump_config(cfg))
    run_log.attach(run.storage)
    if step0_pending and source is None:
        run.write_step0_identity(identity)
    elif step0_pending:
        run.copy_step(0, source)  # with its identity.json, where it has one
        run_log(f"step 0: taken from {step0_from}")
        if trained_apart:
            run_log(f"note: that step 0 was trained differently from this config: "
                    f"{'; '.join(trained_apart)}")
    started = False if local else init_ray(cfg)
    if started:
        run_log(describe_ray())
    try:
        return _run_steps(cfg, task, name, run, (train_dir, eval_dir), selections, run_log,
                          on_step, final)
    finally:
        if started:
            ray.shutdown()


def step_selection(cfg: Config, task: Task, step: int, train_manifest: Manifest,
                   eval_manifest: Manifest, train_dir: str,
                   eval_dir: str) -> tuple[list[str], list[str]]:
    """(training keys, evaluation keys) of `step`; ValueError if either is empty."""
    keys = selected_keys(train_manifest, task, step)
    if not keys:
        raise ValueError(f"step {step} of {task.name} ({task.setting}) selects no training "
                         f"image from {train_dir}")
    # MiB/PLOP's test set of step t: the eval images with a class seen so far (other than
    # background), unless data.eval_filter=false
    eval_keys = eval_selected_keys(eval_manifest, task, step, cfg.data.eval_filter)
    if not eval_keys:
        raise ValueError(f"step {step} of {task.name} selects no evaluation image from "
                         f"{eval_dir} (no image has a class seen so far)")
    return keys, eval_keys


def check_shards(cfg: Config, folders: list[tuple[str, Manifest, list[str]]], log: Log) -> None:
    """The pre-flight: the shards holding the samples of the steps to train, against their
    manifests, before the run folder or Ray exist. A bad shard raises BadShardError (one
    line), or with data.bad_samples=skip is reported and its unreadable samples skipped."""
    started, checked = time.perf_counter(), 0
    for folder, manifest, keys in folders:
        if not keys:
            continue
        try:
            checked += check_run_shards(folder, manifest, keys, cfg.data.verify).num_shards
        except BadShardError as exc:
            if cfg.data.bad_samples != "skip":
                raise
            log(f"warning: bad shards in {exc}; data.bad_samples=skip: the samples that cannot "
                "be read will be skipped and named")
    if checked:
        what = "sizes and sha256" if cfg.data.verify else "sizes (data.verify=false)"
        log(f"checked {checked} shards against their manifests ({what}) in "
            f"{time.perf_counter() - started:.1f} s")


def _train_with_ray(plan: SchedulePlan, cfg: Config, run: RunFolder, gpu: bool, log: RunLog,
                    announce: Callable[[StepJob], None],
                    finished: Callable[[int], None]) -> None:
    """fit_plan in a thread; this thread follows each step's progress and calls `finished`
    as its DONE marker appears. A failure raises StepFailedError naming the step it hit."""
    fit = FitThread(lambda: fit_plan(plan, run, cfg, gpu))
    watch = NodeLossWatch(cfg.engine.node_loss_timeout_s)
    fit.start()
    try:
        for job in plan.jobs:
            announce(job)
            with ProgressFollower(run.storage, run.progress(job.step), log):
                while not run.is_done(job.step) and fit.is_alive():
                    fit.join(POLL_S)
                    watch.check(job.step)  # a lost node nothing replaces: stop, one line
            if not run.is_done(job.step):
                fit.join()
                if fit.error is not None:
                    raise step_failure(job.step, fit.error, log) from fit.error
                raise RuntimeError(f"step {job.step} ended without writing its results")
            finished(job.step)
        fit.join()
        if fit.error is not None:
            raise step_failure(plan.jobs[-1].step, fit.error, log) from fit.error
    finally:
        if plan.board is not None:
            import ray

            ray.kill(plan.board)


def _train_in_process(plan: SchedulePlan, cfg: Config, run: RunFolder, log: RunLog,
                      announce: Callable[[StepJob], None],
                      finished: Callable[[int], None]) -> None:
    """The plan in this thread (engine.launcher=local), progress and tables as with Ray."""
    jobs = {job.step: job for job in plan.jobs}
    follower: list[ProgressFollower] = []

    def before(step: int) -> None:
        announce(jobs[step])
        follower.append(ProgressFollower(run.storage, run.progress(step), log).__enter__())

    def after(step: int) -> None:
        follower.pop().__exit__(None, None, None)
        if not run.is_done(step):
            raise RuntimeError(f"step {step} ended without writing its results")
        finished(step)

    try:
        fit_in_process(plan, cfg, before, after)
    except Exception as exc:
        step = next((t for t in jobs if not run.is_done(t)), plan.jobs[-1].step)
        while follower:
            follower.pop().__exit__(None, None, None)
        raise step_failure(step, exc, log) from exc


def _prune(cfg: Config, run: RunFolder, step: int) -> None:
    if not cfg.run.keep_checkpoints:
        EpochCheckpoints(run, step).prune()


def _run_steps(cfg: Config, task: Task, name: str, run: RunFolder, dirs: tuple[str, str],
               selections: dict[int, tuple[list[str], list[str]]], log: RunLog,
               on_step: StepCallback | None, final: int) -> dict:
    local = cfg.engine.launcher == "local"
    gpu = sees_gpu(cfg) if local else use_gpu(cfg)
    where = "in this process, one worker" if local else f"{cfg.engine.num_workers} workers"
    log(f"run {name}: {task.dataset} {task.name} ({task.setting}), method {cfg.method.name}, "
        f"{task.num_steps} steps, {where} ({'GPU' if gpu else 'CPU'}, {cfg.engine.engine}); "
        f"results in {run.uri()}")
    results: dict[int, dict] = {}
    num_old = len(task.steps[0])
    jobs = []
    for step in range(final + 1):
        if run.is_done(step):
            log(f"step {step}: already complete, skipped")
            results[step] = run.read_metrics(step)
            _prune(cfg, run, step)
            if on_step and step < final:
                on_step(step, results[step])
            continue
        keys, eval_keys = selections[step]
        jobs.append(StepJob(cfg, task, step, name, run.uri(), *dirs, keys, eval_keys,
                            failure_marker_dir=run.failures_dir(), launcher=cfg.engine.launcher,
                            inject_failure=os.environ.get(FAILURE_ENV, "")))
    groups_before = run.worker_group_starts()

    def announce(job: StepJob) -> None:
        log(f"step {job.step}: classes {format_class_ids(task.classes_at(job.step))}, "
            f"{len(job.train_keys)} training images, {len(job.eval_keys)} evaluation images")

    def finished(step: int) -> None:
        results[step] = run.read_metrics(step)
        log(format_step_result(results[step]))
        for line in format_bad_samples(results[step]):
            log(line)
        log(format_class_table([results[t] for t in sorted(results)], num_old))
        _prune(cfg, run, step)
        if on_step and step < final:
            on_step(step, results[step])

    if jobs and local:
        _train_in_process(SchedulePlan(jobs), cfg, run, log, announce, finished)
    elif jobs:
        board = make_board() if cfg.engine.num_workers > 1 else None  # one rank keeps its own
        _train_with_ray(SchedulePlan(jobs, board), cfg, run, gpu, log, announce, finished)
    starts = run.worker_group_starts() - groups_before
    if jobs:
        log(f"{len(jobs)} steps trained by {starts} worker group"
            f"{'s' if starts != 1 else ''} ({'in this process' if local else 'Ray Train'}; "
            f"more than one: restarts after failures)")
    results = [results[t] for t in range(final + 1)]
    summary = {"run": name, "dataset": task.dataset, "task": task.name,
               "setting": task.setting, "method": cfg.method.name,
               "config": config_to_dict(cfg), "complete": final == task.num_steps - 1,
               "worker_group_starts": starts, "steps": results}
    run.write_summary(summary)
    if run.local:
        write_plots(results, Path(run.uri()), name)
    log(f"run {name} complete:\n{format_summary_table(results)}")
    reading = format_reading(results)
    if reading:
        log(reading)
    log(f"summary: {run.uri(SUMMARY)}")
    log(f"run folder: {run.uri()} ({format_bytes(run.size_bytes())})")
    if on_step:
        on_step(final, results[-1])
    return summary

"""Ray Tune sweeps of the distillation weights over several incremental schedules at once.

    driver: prepare the shards; per schedule, the step-0 identity (step0.py); train each
            missing step-0 key once; then one Tune experiment whose trials are
            (schedule, weights) pairs.
    trial:  a whole schedule through run_schedule, its step 0 copied from the cache: one
            TorchTrainer for the trial's steps (engine.launcher=ray), or, with
            engine.launcher=local, the steps trained in the trial's own process (one worker:
            no worker group to start per trial, the trial reserves the worker's CPUs/GPU);
            after every incremental step it reports its metrics, so a scheduler can stop bad
            weights early (ASHA per schedule, the step as time axis).
    end:    tune_summary.json, a table, a plot of the weights against the metric, and the best
            configurations as YAML files that `python -m icd_dist.run` accepts.

The console: the step-0 training prints like a run; then one line per trial start, finished
step and end, and a status line at most every 30 s (sweep_console.py). What the trials and
their workers print stays in each trial's run.log and in Ray's log folder.

Re-running the same sweep (run.name) restores the Tune experiment: finished trials are kept,
unfinished ones restart and skip the steps they had finished.
"""

from __future__ import annotations

import datetime as dt
import json
import pickle
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from ray.tune import Callback
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

from icd_dist.config import (
    Config,
    ConfigError,
    SearchDim,
    check_search_dim,
    config_to_dict,
    dump_config,
    update,
    value_at,
)
from icd_dist.css.tasks import task_from_config
from icd_dist.data.inspect import manifest_spec, selected_keys
from icd_dist.data.manifest import load_manifest
from icd_dist.methods import method_class
from icd_dist.train.ray_session import describe_ray, init_ray
from icd_dist.train.run_folder import RunFolder
from icd_dist.train.schedule import Log, prepare_shards, run_schedule, use_gpu
from icd_dist.train.step0 import step0_identity, step0_key
from icd_dist.train.step0_cache import Step0Cache
from icd_dist.train.storage import Storage
from icd_dist.train.sweep_console import (
    SweepConsole,
    fit_quietly,
    format_params,
    format_value,
    param_labels,
    percent,
)
from icd_dist.train.tracking import Tracker, wandb_mode

METRIC_KEYS = {"all": "miou_all", "hiou": "hiou", "old": "miou_old"}
SUMMARY_NAME = "tune_summary.json"


def sweep_name(cfg: Config) -> str:
    """run.name, or "sweep-{dataset}-{method}-{time}"."""
    if cfg.run.name:
        return cfg.run.name
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"sweep-{cfg.data.dataset}-{cfg.method.name}-{stamp}"


def sweep_space(cfg: Config) -> tuple[SearchDim, ...]:
    """The dimensions the sweep of `cfg` searches: tune.space, or (empty) the method's own
    (Method.search_space), each checked against the config schema and the method: a loss.*
    key the method does not read, or a value its rules refuse (e.g. a loss.seg it does not
    train with), is a ConfigError naming the key, before anything starts."""
    method = method_class(cfg)
    dims = cfg.tune.space or tuple(check_search_dim(d, "tune.space (the method's)")
                                   for d in method.search_space(cfg))
    if not dims:
        raise ConfigError("tune.space", f"searches nothing: method {cfg.method.name!r} "
                          "declares no search space; give config keys, e.g. "
                          "tune.space.optim.lr_incremental={loguniform: [0.0001, 0.01]}")
    reads = method.loss_keys()
    task = task_from_config(cfg)
    step0 = step0_identity(cfg, task, ())
    for dim in dims:
        if dim.key.startswith("loss.") and not any(
                dim.key == k or (k.endswith(".") and dim.key.startswith(k)) for k in reads):
            raise ConfigError(f"tune.space.{dim.key}", f"method {cfg.method.name!r} does not "
                              f"read it; the loss keys it reads: {', '.join(reads)}")
        for value in dim.values:
            try:
                changed = update(cfg, {dim.key: value})
                method.check_config(changed)
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{dim.key}", f"{dim.distribution} value "
                                  f"{value!r}: {exc}") from None
            if step0_identity(changed, task, ()) != step0:
                raise ConfigError(f"tune.space.{dim.key}", "shapes the step-0 model, which "
                                  "the sweep trains once and shares with every trial "
                                  "(train/step0.py); search keys of the incremental steps "
                                  "(e.g. optim.lr_incremental), or sweep step 0 as runs")
    return dims


def config_point(cfg: Config, dims: Sequence[SearchDim]) -> dict:
    """`cfg`'s own values of the searched keys, as a point to evaluate first
    (tune.try_config_first); a ConfigError naming the key where a value lies outside its
    dimension (Optuna could not place it)."""
    point = {}
    for dim in dims:
        value = value_at(cfg, dim.key)
        inside = value in dim.values if dim.distribution == "choice" else \
            dim.values[0] <= value <= dim.values[1]
        if not inside:
            raise ConfigError("tune.try_config_first", f"the config's {dim.key}={value!r} is "
                              f"outside its search dimension ({dim.distribution} "
                              f"{list(dim.values)}); widen the range or set it to false")
        point[dim.key] = value
    return point


def _tune_option(value: object) -> object:
    """A choice option as Tune holds it: lists (e.g. loss.icd.stats) as JSON text, since
    Optuna's categorical options must be plain scalars."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(config_to_dict(value))


def search_space(dims: Sequence[SearchDim]) -> dict:
    """The Tune search space of `dims` (schedule excluded), one entry per config key;
    randint/lograndint include their upper end."""
    from ray import tune

    ranges = {"loguniform": tune.loguniform, "uniform": tune.uniform,
              # Tune's integer ranges exclude their upper end
              "randint": lambda low, high: tune.randint(low, high + 1),
              "lograndint": lambda low, high: tune.lograndint(low, high + 1)}
    return {dim.key: tune.choice([_tune_option(v) for v in dim.values])
            if dim.distribution == "choice" else ranges[dim.distribution](*dim.values)
            for dim in dims}


def trial_params(dims: Sequence[SearchDim], config: Mapping[str, object]) -> dict:
    """A trial's searched values by config key, from its Tune config (schedule dropped,
    JSON-held options decoded)."""
    decode = {dim.key: {_tune_option(v): v for v in dim.values} for dim in dims
              if dim.distribution == "choice"}
    params = {}
    for key, value in config.items():
        if key == "schedule":
            continue
        options = decode.get(key, {})
        params[key] = config_to_dict(options[value]) if isinstance(value, str) and \
            value in options else value
    return params


class PerScheduleASHA(FIFOScheduler):
    """ASHA per schedule: trials are compared only with trials of the same schedule (a 6-1
    step has other numbers than a 6-5 step), with the incremental step as the time axis.
    A trial scheduler for Tune, delegating to one AsyncHyperBandScheduler per schedule."""

    def __init__(self, last_steps: Mapping[str, int], grace_period: int,
                 reduction_factor: float):
        super().__init__()
        self._metric, self._mode = "score", "max"
        self.by_schedule = {
            name: AsyncHyperBandScheduler(
                time_attr="step", metric="score", mode="max", max_t=max(last, 1),
                grace_period=min(grace_period, max(last, 1)), reduction_factor=reduction_factor,
                stop_last_trials=False)
            for name, last in last_steps.items()}

    def _sub(self, trial):
        return self.by_schedule[trial.config["schedule"]]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        """The metric is fixed ("score", maximised)."""
        return metric in (None, "score") and mode in (None, "max")

    def on_trial_add(self, controller, trial):
        """Register the trial with its schedule's ASHA."""
        self._sub(trial).on_trial_add(controller, trial)

    def on_trial_result(self, controller, trial, result):
        """CONTINUE or STOP, as the trial's schedule's ASHA decides at this step."""
        return self._sub(trial).on_trial_result(controller, trial, result)

    def on_trial_complete(self, controller, trial, result):
        """Record the trial's last result in its schedule's rungs."""
        self._sub(trial).on_trial_complete(controller, trial, result)

    def on_trial_remove(self, controller, trial):
        """Forget the trial (ASHA itself fails on a trial it has already completed)."""
        sub = self._sub(trial)
        if trial.trial_id in sub._trial_info:
            sub.on_trial_remove(controller, trial)

    def on_trial_error(self, controller, trial):
        """Forget a failed trial (Tune may retry it as a new add)."""
        self.on_trial_remove(controller, trial)

    def debug_string(self) -> str:
        """Each schedule's ASHA state."""
        return "\n".join(f"{name}: {sub.debug_string()}" for name, sub in self.by_schedule.items())

    def save(self, checkpoint_path: str):
        """Pickle the per-schedule ASHAs (Tune's experiment checkpoint)."""
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.by_schedule, f)

    def restore(self, checkpoint_path: str):
        """Load what save() wrote (resuming a sweep)."""
        with open(checkpoint_path, "rb") as f:
            self.by_schedule = pickle.load(f)


def _score(metrics: Mapping, metric: str) -> float:
    value = metrics.get(METRIC_KEYS[metric])
    return 0.0 if value is None else float(value)


def sweep_trial(config: dict, base: dict, sweep_root: str, cache_root: str,
                step0_keys: Mapping[str, str], metric: str,
                dims: Sequence[SearchDim]) -> None:
    """One trial: the schedule config["schedule"] with the sampled values, step 0 from the
    cache, a report after every incremental step."""
    from ray import tune

    from icd_dist.config import config_from_dict

    trial_id = tune.get_context().get_trial_id()
    schedule = config["schedule"]
    params = trial_params(dims, config)
    trials = Storage(sweep_root).child("trials")
    cfg = update(config_from_dict(base), {
        "task.name": schedule, "run.name": trial_id, "run.storage_path": trials.uri(),
        "logging.group": Path(sweep_root).name, **params})
    run = trials.child(trial_id)
    run.makedirs()
    attempts = list(run.read_json("attempts.json")) if run.exists("attempts.json") else []
    run.write_json("attempts.json", [*attempts, dt.datetime.now().isoformat(timespec="seconds")])
    run.write_json("params.json", {"schedule": schedule, **params})

    def report(step: int, metrics: dict) -> None:
        if step == 0:
            return  # the shared step 0 says nothing about the weights
        tune.report({"step": step, "score": _score(metrics, metric), "schedule": schedule,
                     **{k: metrics.get(k) for k in ("miou_all", "miou_old", "miou_new",
                                                    "hiou")}})

    run_schedule(cfg, on_step=report,
                 step0_from=Step0Cache(cache_root).run_folder(step0_keys[schedule]).uri())


class WandbTrialRuns(Callback):
    """One W&B run per trial in the sweep's group, logging what the trial reports after each
    step (the step workers log their own runs in the same group). Runs in the driver."""

    def __init__(self, cfg: Config, group: str, mode: str, storage: Storage):
        self.cfg, self.group, self.mode = cfg, group, mode
        self.folder = Path(storage.path("wandb")) if storage.local else \
            Path(tempfile.gettempdir()) / group / "wandb"
        self.runs: dict[str, Tracker] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id not in self.runs:
            lc = self.cfg.logging
            self.runs[trial.trial_id] = Tracker(True, self.mode, self.folder, lc.project,
                                                lc.entity, self.group, trial.trial_id,
                                                dict(trial.config))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run = self.runs.get(trial.trial_id)
        if run is not None:
            run.log({k: result[k] for k in ("score", "miou_all", "miou_old", "miou_new", "hiou")
                     if result.get(k) is not None}, at=int(result["step"]))

    def _finish(self, trial):
        run = self.runs.pop(trial.trial_id, None)
        if run is not None:
            run.finish()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial)


def trial_concurrency(cfg: Config, gpus: bool, resources: Mapping[str, float],
                      fixed_size: bool) -> int:
    """How many trials run at once: tune.max_concurrent, or (0) as many as `resources` fit.
    On a cluster that cannot grow (fixed_size, e.g. the local one), a trial that does not fit
    at all is a ConfigError: its TorchTrainer would wait forever for CPUs its own driver
    holds."""
    e, t = cfg.engine, cfg.tune
    per_trial_cpus = e.num_workers * e.cpus_per_worker + t.trial_cpus  # GPU workers too
    if fixed_size and per_trial_cpus > resources.get("CPU", 0) + 1e-9:
        raise ConfigError("engine.cpus_per_worker", f"one trial needs {per_trial_cpus:g} CPUs "
                          f"(engine.num_workers x engine.cpus_per_worker + tune.trial_cpus) but "
                          f"this cluster has {resources.get('CPU', 0):g}; lower "
                          "engine.cpus_per_worker (e.g. 0.9), engine.num_workers or "
                          "tune.trial_cpus")
    if t.max_concurrent:
        return t.max_concurrent
    if gpus:
        return max(1, int(resources.get("GPU", 0) // (e.num_workers * e.gpus_per_worker)))
    return max(1, int(resources.get("CPU", 1) // per_trial_cpus))


def trial_resources(cfg: Config, gpu: bool) -> dict[str, float]:
    """What a trial's own process reserves: tune.trial_cpus for a driver of a TorchTrainer
    (its workers reserve theirs), plus the one worker's CPUs (and GPU) when the trial trains
    in-process (engine.launcher=local)."""
    if cfg.engine.launcher != "local":
        return {"cpu": cfg.tune.trial_cpus}
    e = cfg.engine
    return {"cpu": cfg.tune.trial_cpus + e.cpus_per_worker,
            **({"gpu": e.gpus_per_worker} if gpu else {})}


def _tuner(cfg: Config, trainable, space: dict, schedules: Sequence[str],
           last_steps: Mapping[str, int], storage: Storage, name: str,
           points: Sequence[Mapping] | None, concurrency: int, log: Log):
    from ray import tune
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    t = cfg.tune
    if t.search == "random":
        # Each sampled weight set runs on every schedule (constant over the schedule grid).
        search = BasicVariantGenerator(points_to_evaluate=list(points or []) or None,
                                       constant_grid_search=True, random_state=t.seed,
                                       max_concurrent=concurrency)
        param_space = {"schedule": tune.grid_search(list(schedules)), **space}
    else:
        from ray.tune.search.optuna import OptunaSearch

        param_space = {"schedule": tune.choice(list(schedules)), **space}
        # Optuna's points name every dimension, the schedule too: each point on each schedule
        search = ConcurrencyLimiter(OptunaSearch(
            metric="score", mode="max", seed=t.seed,
            points_to_evaluate=[{"schedule": s, **p} for p in points or () for s in schedules]
            or None), max_concurrent=concurrency)
    scheduler = PerScheduleASHA(last_steps, t.grace_period, t.reduction_factor) \
        if t.scheduler == "asha" else None
    mode = wandb_mode(cfg.logging.wandb)
    callbacks = [SweepConsole(log, storage.child("trials"), last_steps)]
    if mode != "disabled":
        callbacks.append(WandbTrialRuns(cfg, name, mode, storage))
    run_config = tune.RunConfig(  # verbose=0: Tune prints nothing itself (fit_quietly)
        name="tune", storage_path=storage.uri(), callbacks=callbacks,
        failure_config=tune.FailureConfig(max_failures=t.max_failures), verbose=0)
    tune_config = tune.TuneConfig(
        metric="score", mode="max", search_alg=search, scheduler=scheduler,
        num_samples=t.num_samples)
    path = storage.uri("tune")
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, param_space=param_space)
        # The restored RunConfig is the one pickled when the sweep first started: this
        # driver's console and settings replace its callbacks and verbosity (no public API).
        restored = tuner._local_tuner.get_run_config()
        restored.callbacks, restored.verbose = callbacks, run_config.verbose
        return tuner, True
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=run_config), False


def run_sweep(cfg: Config, log: Log | None = None,
              points: Sequence[Mapping] | None = None) -> dict:
    """Run (or resume) the sweep of `cfg.tune`; returns the summary also written as
    tune_summary.json. `points` are value sets to evaluate first (e.g. the shipped
    defaults), each a mapping of the searched config keys to values."""
    import ray
    from ray import tune

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    dims = sweep_space(cfg)
    if cfg.tune.try_config_first:
        points = [config_point(cfg, dims), *(points or ())]
    name = sweep_name(cfg)
    storage = Storage(cfg.run.storage_path).child(name)
    storage.makedirs()
    train_dir, eval_dir = prepare_shards(cfg, log)
    cfg = update(cfg, {"data.train_shards": train_dir, "data.eval_shards": eval_dir,
                       "run.name": name})
    storage.write_bytes("config.yaml", dump_config(cfg).encode())
    manifest = load_manifest(train_dir)
    spec = manifest_spec(manifest)
    schedules = list(cfg.tune.schedules) or [cfg.task.name]
    keys, last_steps, step0_configs = {}, {}, {}
    for schedule in schedules:
        sched_cfg = update(cfg, {"task.name": schedule})
        task = task_from_config(sched_cfg, spec)
        if task.num_steps < 2:
            raise ConfigError("tune.schedules", f"{schedule!r} has one step: nothing to distil")
        identity = step0_identity(sched_cfg, task, selected_keys(manifest, task, 0))
        keys[schedule] = step0_key(identity)
        step0_configs[keys[schedule]] = sched_cfg
        last_steps[schedule] = task.num_steps - 1
    cache = Step0Cache(cfg.run.storage_path)
    started = init_ray(cfg)
    if started:
        log(describe_ray())
    try:
        # A Ray this call started is this machine alone: it cannot grow to fit a trial.
        concurrency = trial_concurrency(cfg, use_gpu(cfg), ray.cluster_resources(),
                                        fixed_size=started)
        for key, sched_cfg in step0_configs.items():
            shared = [s for s in schedules if keys[s] == key]
            if cache.is_ready(key):
                log(f"step 0 {key} ({', '.join(shared)}): reused from "
                    f"{cache.run_folder(key).uri()}")
                continue
            log(f"step 0 {key} ({', '.join(shared)}): training it once for the sweep")
            cache.train(sched_cfg, key, log, by=name)
        trainable = tune.with_resources(
            tune.with_parameters(sweep_trial, base=config_to_dict(cfg),
                                 sweep_root=storage.uri(),
                                 # absolute: a trial runs in its own working directory, where
                                 # a relative storage_path would name another folder
                                 cache_root=Storage(cfg.run.storage_path).uri(),
                                 step0_keys=keys, metric=cfg.tune.metric, dims=dims),
            trial_resources(cfg, use_gpu(cfg)))
        tuner, restored = _tuner(
            cfg, trainable, search_space(dims), schedules, last_steps, storage, name,
            [{k: _tune_option(v) for k, v in p.items()} for p in points or ()], concurrency,
            log)
        log(f"sweep {name}: {'resuming' if restored else 'starting'}; schedules "
            f"{', '.join(schedules)}; up to {concurrency} trials at once; results in "
            f"{storage.uri()}")
        log(f"trials' consoles in {storage.uri('trials')}/<trial>/run.log, their workers' "
            "output in Ray's logs; here one line per trial start, step and end")
        grid = fit_quietly(tuner)
        summary = summarize(cfg, dims, name, storage, grid, schedules, last_steps, keys,
                            cache)
    finally:
        if started:
            ray.shutdown()
    return summary


def _trial_rows(storage: Storage, grid, dims: Sequence[SearchDim],
                last_steps: Mapping[str, int], metric: str) -> list:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        # A trial that failed before its first report has no metrics: its id is in its folder
        # name ("sweep_trial_{id}_{index}_...", ids like "f38dc_00003").
        found = re.search(r"[0-9a-f]{5}_\d{5}", Path(result.path).name)
        trial_id = metrics.get("trial_id") or (found.group(0) if found else Path(result.path).name)
        config = trial_params(dims, result.config or {})
        schedule = (result.config or {}).get("schedule")
        trial = storage.child("trials").child(trial_id)
        run = RunFolder(trial)
        steps = []
        for step in range(last_steps.get(schedule, -1) + 1):
            if run.has_metrics(step):
                m = run.read_metrics(step)
                steps.append({k: m.get(k) for k in ("step", "miou_old", "miou_new", "miou_all",
                                                    "hiou", "seconds")})
        reached = steps[-1]["step"] if steps else -1
        if result.error is not None:
            status = "error"
        elif reached == last_steps.get(schedule):
            status = "finished"
        else:
            status = "stopped"
        attempts = trial.read_json("attempts.json") if trial.exists("attempts.json") else []
        rows.append({
            "trial_id": trial_id, "schedule": schedule, "params": config, "status": status,
            "last_step": reached, "steps": steps, "attempts": len(attempts),
            "score": _score(steps[-1], metric) if steps and status == "finished" else None,
            "error": str(result.error)[:500] if result.error is not None else None})
    return sorted(rows, key=lambda r: (r["schedule"] or "", r["trial_id"]))


def _param_key(params: Mapping) -> str:
    return json.dumps(params, sort_keys=True)


def summarize(cfg: Config, dims: Sequence[SearchDim], name: str, storage: Storage, grid,
              schedules: Sequence[str], last_steps: Mapping[str, int], keys: Mapping[str, str],
              cache: Step0Cache) -> dict:
    """tune_summary.json, the best YAMLs, the plot and the printed table of a finished sweep."""
    rows = _trial_rows(storage, grid, dims, last_steps, cfg.tune.metric)
    best_per_schedule = {}
    for schedule in schedules:
        done = [r for r in rows if r["schedule"] == schedule and r["score"] is not None]
        if done:
            best = max(done, key=lambda r: r["score"])
            best_per_schedule[schedule] = {"trial_id": best["trial_id"], "score": best["score"],
                                           "params": best["params"]}
    # Overall: the weight set with the best mean over schedules of its score relative to the
    # schedule's best (schedules have different scales); sets run on every schedule first.
    by_params: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["score"] is not None:
            by_params.setdefault(_param_key(r["params"]), {})[r["schedule"]] = r["score"]
    overall = None
    if by_params:
        complete = {k: v for k, v in by_params.items() if len(v) == len(schedules)}
        pool = complete or by_params
        def relative(scores):  # noqa: E306
            return sum(s / max(best_per_schedule[k]["score"], 1e-12)
                       for k, s in scores.items()) / len(scores)
        best_key = max(pool, key=lambda k: relative(pool[k]))
        overall = {"params": json.loads(best_key), "relative_score": relative(pool[best_key]),
                   "scores": pool[best_key], "on_every_schedule": bool(complete)}
    files = {}
    for schedule, best in best_per_schedule.items():
        files[schedule] = _write_best(cfg, storage, f"best_{schedule}.yaml", schedule,
                                      best["params"], f"{name}-best-{schedule}")
    if overall:
        files["overall"] = _write_best(cfg, storage, "best.yaml", schedules[0],
                                       overall["params"], f"{name}-best")
    step0 = {}
    for key in sorted(set(keys.values())):
        trainings = cache.trainings(key)
        step0[key] = {"schedules": [s for s in schedules if keys[s] == key],
                      "trainings": len(trainings),
                      "reused_by_trials": sum(1 for r in rows if keys.get(r["schedule"]) == key
                                              and r["steps"])}
    summary = {
        "sweep": name, "dataset": cfg.data.dataset, "method": cfg.method.name,
        "metric": cfg.tune.metric, "search": cfg.tune.search, "scheduler": cfg.tune.scheduler,
        "space": {d.key: {d.distribution: config_to_dict(d.values)} for d in dims},
        "schedules": {s: {"steps": last_steps[s] + 1, "step0_key": keys[s]} for s in schedules},
        "step0": {"keys": step0, "trainings_run": sum(v["trainings"] for v in step0.values()),
                  "reused": sum(v["reused_by_trials"] for v in step0.values())},
        "trials": rows, "best_per_schedule": best_per_schedule, "best_overall": overall,
        "best_configs": files, "config": config_to_dict(cfg),
    }
    storage.write_json(SUMMARY_NAME, summary)
    if storage.local:
        write_sweep_plot(rows, cfg.tune.metric, Path(storage.path("weights_vs_metric.png")))
    print(format_sweep_table(summary), flush=True)
    print(f"summary: {storage.uri(SUMMARY_NAME)}", flush=True)
    return summary


def _write_best(cfg: Config, storage: Storage, filename: str, schedule: str,
                params: Mapping, run_name: str) -> str:
    best = update(cfg, {"task.name": schedule, "run.name": run_name, **params})
    storage.write_bytes(filename, dump_config(best).encode())
    return storage.uri(filename)


def format_sweep_table(summary: Mapping) -> str:
    """A console table of the trials (one line each: weights, status, last step reached, its
    old/new/hIoU and the score), a line on how to read it, and the best weights."""
    names = sorted({k for r in summary["trials"] for k in r["params"]})
    labels = param_labels(names)
    widths = {n: max(13, len(labels[n]) + 2,
                     *(len(format_value(r["params"].get(n))) + 2 for r in summary["trials"]))
              for n in names}
    head = f"{'trial':<14}{'schedule':>9}" + "".join(f"{labels[n]:>{widths[n]}}"
                                                      for n in names) + \
        f"{'status':>10}{'step':>6}{'old':>8}{'new':>8}{'hIoU':>8}{'score':>8}"
    lines = [head, "-" * len(head)]
    for r in summary["trials"]:
        cells = "".join(f"{format_value(r['params'].get(n)):>{widths[n]}}" for n in names)
        last = r["steps"][-1] if r["steps"] else {}
        quality = "".join(f"{percent(last.get(k)):>8}" for k in ("miou_old", "miou_new", "hiou"))
        lines.append(f"{r['trial_id'][-14:]:<14}{r['schedule']:>9}{cells}{r['status']:>10}"
                     f"{r['last_step']:>6}{quality}{percent(r['score']):>8}")
    metric = {"all": "all-class mIoU", "hiou": "hIoU", "old": "old-class mIoU"}.get(
        summary.get("metric"), summary.get("metric"))
    lines.append(f"score: {metric} after the schedule's last step (finished trials only); "
                 "old = step-0 classes (stability), new = the classes added since")
    lines.append("(plasticity), both at the last step reached; new near 0 = the distillation "
                 "weights were too strong for the new classes to be learned.")
    s0 = summary["step0"]
    lines.append(f"step 0: {len(s0['keys'])} key(s), {s0['trainings_run']} training(s), "
                 f"reused by {s0['reused']} trial(s)")
    for schedule, best in summary["best_per_schedule"].items():
        lines.append(f"best on {schedule}: {100 * best['score']:.2f} with "
                     f"{format_params(best['params'])}")
    if summary["best_overall"]:
        lines.append(f"best overall: {format_params(summary['best_overall']['params'])} "
                     f"-> {summary['best_configs'].get('overall')}")
    return "\n".join(lines)


def write_sweep_plot(rows: Sequence[Mapping], metric: str, path: Path) -> Path | None:
    """Each numeric searched weight against the final metric, one colour per schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["score"] is not None]
    names = sorted({k for r in done for k, v in r["params"].items()
                    if isinstance(v, (int, float))})
    if not done or not names:
        return None
    labels = param_labels(names)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
    for ax, n in zip(axes[0], names, strict=True):
        for schedule in sorted({r["schedule"] for r in done}):
            pts = [(r["params"][n], 100 * r["score"]) for r in done
                   if r["schedule"] == schedule and n in r["params"]]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=schedule)
        if all(r["params"].get(n, 1) > 0 for r in done):
            ax.set_xscale("log")
        ax.set_xlabel(labels[n])
        ax.set_ylabel(f"final {metric} mIoU (%)" if metric != "hiou" else "final hIoU (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path



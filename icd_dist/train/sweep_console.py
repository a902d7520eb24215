"""A sweep's console: what the driver prints while Tune runs the trials.

The trials' own output stays off it: Ray starts with `log_to_driver=False` (ray_session), so
what a trial prints (its run's lines) is in its run folder's run.log and, with what its
workers print (Ray Train's and DeepSpeed's messages), in Ray's log folder. Tune's own
reporter, whose status table filled the console, is off too (`fit_quietly`). SweepConsole, a
Tune callback in the driver, prints instead:

    trial 571c1_00000 3-1: started with lambda_ext=3.464, lambda_int=1.879
    sweep 1m30s: 571c1_00000 step 1 epoch 5/12, 571c1_00001 step 1 epoch 4/12; 2 pending
    trial 571c1_00000 3-1 step 1/1: old 70.69 new 56.22 all 67.80 hIoU 62.63
    trial 571c1_00000 3-1: finished

one line when a trial starts, one per step it finishes, one when it ends (finished, stopped
early by ASHA, failed), and the status of the running trials (their last progress line's
step and epoch, read from their run folders) after `interval_s` (30 s) without a line, only
when it has changed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping

from ray.tune import Callback

from icd_dist.train.progress import read_complete_lines
from icd_dist.train.run_folder import RunFolder
from icd_dist.train.storage import Storage

STATUS_INTERVAL_S = 30.0
LOOK_S = 5.0  # how often the status is read (the trials' progress files) once it may print
# "0": Tune's old output engine, silent at verbose=0 (the new one, Ray's default, prints its
# experiment table at any verbosity).
NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"
STEP_METRICS = (("old", "miou_old"), ("new", "miou_new"), ("all", "miou_all"), ("hIoU", "hiou"))


def percent(v: float | None) -> str:
    """A metric in [0, 1] as a percentage with 2 decimals, "-" when missing."""
    return "-" if v is None else f"{100 * v:.2f}"


def param_labels(keys: Iterable[str]) -> dict[str, str]:
    """Short labels of searched config keys: the last part ("loss.icd.lambda_int" ->
    "lambda_int"), or the whole key where two keys share their last part."""
    keys = list(keys)
    tails = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: t if tails.count(t) == 1 else k for k, t in zip(keys, tails, strict=True)}


def format_value(v: object) -> str:
    """A searched value: floats to 4 significant digits, lists as a,b,c."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(format_value, v))
    return str(v)


def format_params(params: Mapping[str, object]) -> str:
    """The searched values, "label=value" by config key (param_labels, format_value)."""
    labels = param_labels(params)
    return ", ".join(f"{labels[k]}={format_value(v)}" for k, v in sorted(params.items()))


def format_step_line(trial_id: str, schedule: str, step: int, last_step: int | None,
                     metrics: Mapping) -> str:
    """One finished step of a trial: 'trial ID SCHEDULE step t/T: old .. new .. all ..
    hIoU ..' (percent)."""
    cells = " ".join(f"{label} {percent(metrics.get(key))}" for label, key in STEP_METRICS)
    return f"trial {trial_id} {schedule} step {step}/{last_step}: {cells}"


def format_elapsed(seconds: float) -> str:
    """'45s', '2m05s', '1h02m'."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def fit_quietly(tuner):
    """`tuner.fit()` with Tune's own console reporter off (its RunConfig has verbose=0);
    the environment is restored afterwards."""
    before = os.environ.get(NEW_OUTPUT_ENV)
    os.environ[NEW_OUTPUT_ENV] = "0"
    try:
        return tuner.fit()
    finally:
        if before is None:
            os.environ.pop(NEW_OUTPUT_ENV, None)
        else:
            os.environ[NEW_OUTPUT_ENV] = before


class SweepConsole(Callback):
    """Prints the sweep's trial lines through `log` (see the module docstring). `trials` is
    the sweep's trials folder (one run folder per trial id), `last_steps` each schedule's
    last step. Runs in the driver; `clock` is for tests."""

    def __init__(self, log: Callable[[str], None], trials: Storage,
                 last_steps: Mapping[str, int], interval_s: float = STATUS_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.log, self.trials, self.last_steps = log, trials, dict(last_steps)
        self.interval_s, self.clock = interval_s, clock
        self._start = self._last_line = clock()
        self._last_look = float("-inf")
        self._status = ""
        self._steps: dict[str, int] = {}

    def setup(self, **info) -> None:
        """The sweep's clock starts now."""
        self._start = self._last_line = self.clock()

    def _say(self, line: str) -> None:
        self.log(line)
        self._last_line = self.clock()

    def _name(self, trial) -> str:
        return f"trial {trial.trial_id} {trial.config.get('schedule')}"

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        """'trial ID SCHEDULE: started with <weights>'."""
        params = {k: v for k, v in trial.config.items() if k != "schedule"}
        self._say(f"{self._name(trial)}: started with {format_params(params)}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        """The step line of the step the trial has just reported."""
        step = int(result["step"])
        self._steps[trial.trial_id] = step
        schedule = trial.config.get("schedule")
        self._say(format_step_line(trial.trial_id, schedule, step,
                                   self.last_steps.get(schedule), result))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        """'finished' after the schedule's last step, else 'stopped early' (the scheduler)."""
        step = self._steps.get(trial.trial_id, (trial.last_result or {}).get("step"))
        last = self.last_steps.get(trial.config.get("schedule"))
        if step is None:
            self._say(f"{self._name(trial)}: ended without reporting a step")
        elif step == last:
            self._say(f"{self._name(trial)}: finished")
        else:
            self._say(f"{self._name(trial)}: stopped early by the scheduler after step "
                      f"{step}/{last}")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        """A failed trial Tune restarts (tune.max_failures): where its traceback is."""
        self._say(f"{self._name(trial)}: failed, restarting (traceback in "
                  f"{self.trials.child(trial.trial_id).uri('run.log')})")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        """A trial that failed for good: where its traceback is."""
        self._say(f"{self._name(trial)}: failed (traceback in "
                  f"{self.trials.child(trial.trial_id).uri('run.log')})")

    def on_step_end(self, iteration, trials, **info) -> None:
        """The status line, after interval_s without a line, if it has changed."""
        now = self.clock()
        if now - self._last_line < self.interval_s or now - self._last_look < LOOK_S:
            return
        self._last_look = now
        status = self.status(trials)
        if status != self._status:
            self._status = status
            self._say(f"sweep {format_elapsed(now - self._start)}: {status}")

    def status(self, trials) -> str:
        """The running trials with the step and epoch each is at, and the counts of the
        others: '571c1_00000 step 1 epoch 5/12; 2 pending, 1 done'."""
        running = [f"{t.trial_id} {self._position(t)}" for t in trials if t.status == "RUNNING"]
        counts = dict.fromkeys(("pending", "done", "failed"), 0)
        for t in trials:
            if t.status != "RUNNING":
                counts[{"TERMINATED": "done", "ERROR": "failed"}.get(t.status, "pending")] += 1
        others = ", ".join(f"{n} {word}" for word, n in counts.items() if n)
        return "; ".join(x for x in (", ".join(running) or "no trial running", others) if x)

    def _position(self, trial) -> str:
        """The trial's last progress line up to its ':' ('step 1 epoch 5/12')."""
        last = self.last_steps.get(trial.config.get("schedule"), 1)
        step = min(self._steps.get(trial.trial_id, 0) + 1, last)
        run = RunFolder(self.trials.child(trial.trial_id))
        try:
            lines = read_complete_lines(run.storage, run.progress(step))
        except OSError:
            lines = []
        return lines[-1].split(":", 1)[0] if lines else f"step {step}"

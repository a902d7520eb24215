"""Where a schedule's steps train: one Ray Train fit for all of them, or the driver's process.

- `ray` (engine.launcher=ray, the default): one TorchTrainer per schedule (or per sweep
  trial) whose workers loop over the steps still to train (step_worker.run_plan), so Ray
  Train starts its controller, placement group, workers and process group once, not once per
  step. A lost worker restarts the group (FailureConfig); the loop skips the steps already
  DONE and resumes the interrupted one from its epoch checkpoint. The fit runs in a thread
  of the driver while the driver follows the steps' progress and prints each step's tables
  as its DONE appears (FitThread).
- `local` (engine.launcher=local): the same loop in the driver's own thread, one worker, in a
  process group of one (gloo, or NCCL on a GPU) as Ray Train would make it, so DDP and
  DeepSpeed take the same code paths; no Ray at all: a user can step through a method with
  pdb, and tests of method behaviour need no cluster.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator

import torch

from icd_dist.config import Config
from icd_dist.train.plan import SchedulePlan, train_schedule_worker
from icd_dist.train.run_folder import RunFolder
from icd_dist.train.step_worker import run_plan, sees_gpu


def fit_with_ray(plan: SchedulePlan, run: RunFolder, cfg: Config, gpu: bool) -> None:
    """One Ray Train fit whose workers train every step of `plan` (blocks until it ends)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    e = cfg.engine
    resources = {"CPU": e.cpus_per_worker, **({"GPU": e.gpus_per_worker} if gpu else {})}
    first = plan.jobs[0]
    TorchTrainer(
        train_schedule_worker,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=e.num_workers, use_gpu=gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=e.placement_strategy),
        run_config=RunConfig(
            name=f"{first.run_name}-from-step{first.step}", storage_path=run.uri("ray"),
            failure_config=FailureConfig(max_failures=e.max_failures)),
    ).fit()


@contextlib.contextmanager
def process_group_of_one(gpu: bool) -> Iterator[None]:
    """A torch.distributed group of one rank (gloo, NCCL on a GPU) and the variables Ray
    Train sets for a worker (RANK, LOCAL_RANK, WORLD_SIZE), for the in-process launcher;
    nothing is changed where a group exists already."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if gpu:
        torch.cuda.set_device(0)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl" if gpu else "gloo", init_method=f"file://{tmp}/store",
                                rank=0, world_size=1)
        try:
            yield
        finally:
            _destroy_process_group()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _destroy_process_group() -> None:
    """Destroy the default process group, through DeepSpeed where it used it: DeepSpeed keeps
    its own references to the groups (its world and data-parallel groups), which a plain
    torch destroy leaves pointing at the dead group, so the next in-process fit in this
    process would fail on them."""
    import sys

    import torch.distributed as dist

    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    if dist.is_initialized():
        dist.destroy_process_group()


def fit_in_process(plan: SchedulePlan, cfg: Config,
                   before_step: Callable[[int], None] | None = None,
                   after_step: Callable[[int], None] | None = None) -> None:
    """Train every step of `plan` in this thread as one worker (engine.launcher=local)."""
    gpu = sees_gpu(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.engine.cpus_per_worker)))
    try:
        with process_group_of_one(gpu), quiet_deepspeed():
            run_plan(plan, before_step=before_step, after_step=after_step)
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def quiet_deepspeed() -> Iterator[None]:
    """DeepSpeed's logger kept to errors while a fit runs in this process: its INFO/WARNING lines
    ("untested optimizer", its config dump) go to stdout, where a Ray worker's go to Ray's
    logs; in-process they would break the console and `icd_dist.run`'s result-only stdout."""
    import logging

    def below_error(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    # a filter, not a level: deepspeed.initialize sets the logger's level from its config
    logger = logging.getLogger("DeepSpeed")
    logger.addFilter(below_error)
    try:
        yield
    finally:
        logger.removeFilter(below_error)


class FitThread(threading.Thread):
    """Runs `fit()` in a daemon thread and keeps what it raised (`error`)."""

    def __init__(self, fit: Callable[[], None]):
        super().__init__(name="icd_dist-fit", daemon=True)
        self._fit = fit
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread
            self.error = exc

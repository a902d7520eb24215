"""What one fit trains (SchedulePlan: a StepJob per step still to train) and the Ray Train
entry point that hands it to the worker loop (step_worker.run_plan).

Torch-free on purpose: Ray Train's controller unpickles the entry point and its config to
start the workers, and everything they reference is imported there; kept here, the controller
imports neither torchvision nor DeepSpeed nor the models (measured: 6.1 -> 3.9 CPU-s a fit).
"""

from __future__ import annotations

from dataclasses import dataclass

from icd_dist.config import Config
from icd_dist.css.tasks import Task
from icd_dist.train.run_folder import RunFolder

# Test hook: "STEP:EPOCH:RANK" in the driver's environment makes that worker exit abruptly
# once, to test recovery; "STEP:EPOCH:RANK:hold" makes it wait there instead, its Ray node id
# in the marker, until a test removes that node (read by the driver into
# StepJob.inject_failure).
FAILURE_ENV = "ICD_DIST_INJECT_FAILURE"


@dataclass
class StepJob:
    """Everything a worker needs for one step (pickled into the TorchTrainer config)."""

    cfg: Config
    task: Task
    step: int
    run_name: str
    run_uri: str
    train_shards: str
    eval_shards: str
    train_keys: list[str]
    eval_keys: list[str]
    teacher: object = None  # the previous step's weights: an ObjectRef or arrays (None: none)
    failure_marker_dir: str = ""
    inject_failure: str = ""  # FAILURE_ENV's value in the driver (a test hook)
    launcher: str = "ray"  # engine.launcher: "local" runs in the driver's process

    @property
    def folder(self) -> str:
        """The step's folder inside the run."""
        return RunFolder.step_dir(self.step)


@dataclass
class SchedulePlan:
    """What one fit trains: the jobs of the steps still to train, in order, computed before
    Ray starts (classes, selections, budgets come with each job's config and task); with
    several Ray workers, the board actor through which each step's teacher reaches them."""

    jobs: list[StepJob]
    board: object = None  # teacher_board.TeacherBoard handle (None: one worker)


def train_schedule_worker(config: dict) -> None:
    """Ray Train loop of a schedule: step_worker.run_plan over config["plan"]'s steps,
    reporting each epoch to Ray Train (the worker imports the training stack here)."""
    import ray.train
    import torch

    from icd_dist.train.step_worker import run_plan

    plan: SchedulePlan = config["plan"]
    torch.set_num_threads(max(1, int(plan.jobs[0].cfg.engine.cpus_per_worker)))
    run_plan(plan, ray.train.report)

"""Integration fixtures: a local Ray started and shut down by the tests that use it, and a
tiny synthetic-data config."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from icd_dist.config import load_config

# Ray Train for these fits of seconds: its controller polls the workers every 0.25 s, not 2 s
# (each fit waits out a poll at its start and its end), and starts no preemption-watcher actor
# (a process per fit; no test preempts a node). Subprocess drivers inherit both.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

TINY = [
    "data.dataset=synthetic", "data.synthetic.num_train=32", "data.synthetic.num_eval=12",
    "data.synthetic.classes=4", "data.synthetic.height=48", "data.synthetic.width=48",
    "data.crop_size=48", "data.eval_size=48", "data.loader_workers=0", "data.pipeline=torch",
    "task.name=2-1", "method.name=icd", "model.backbone=resnet18", "model.head_channels=32",
    "model.norm=groupnorm", "optim.optimizer=adamw", "optim.lr=0.002",
    "optim.lr_incremental=0.001", "optim.batch_size=8", "optim.epochs=2",
    "engine.num_workers=2", "engine.cpus_per_worker=1", "engine.zero_stage=1",
    # W&B off (its start costs each step about 2 s); the tests that read its files turn it on
    "eval.batch_size=8", "logging.wandb=disabled", "logging.log_every=1",
    "logging.num_overlays=2",
    # the readable ICD losses: the compiled path (CPU's default) costs each worker process
    # a compile, and tests/unit/test_icd_kernels.py checks it equals this one
    "loss.icd.impl=eager",
]


def tiny_config(tmp_path, *overrides):
    """The tiny config with shards and runs under tmp_path."""
    return load_config(None, [*TINY, f"data.train_shards={tmp_path}/data/train",
                              f"data.eval_shards={tmp_path}/data/val",
                              f"run.storage_path={tmp_path}/runs", *overrides])


@pytest.fixture
def local_ray():
    """A 2-CPU local Ray for one test, always shut down afterwards."""
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def ray_stop() -> None:
    """`ray stop --force`: stop whatever Ray a killed driver left behind (its local cluster).
    It stops every Ray of this machine, which is right for these sequential tests."""
    ray = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray), "stop", "--force"], capture_output=True, timeout=120)


def run_until_then_kill(cmd: list[str], cwd: Path, env: dict, log_path: Path,
                        ready: Callable[[], bool]) -> None:
    """Start `cmd` in its own session (stderr to log_path), wait until ready() holds, then
    SIGKILL its whole process group (a driver dying mid-way) and stop the Ray it left.
    Fails with the log's tail if the command exits before ready()."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        while not ready():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        ray_stop()

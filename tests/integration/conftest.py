"""Integration fixtures: a local Ray started and shut down by the tests that use it, and a
tiny synthetic-data config."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
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


@pytest.fixture
def own_ray():
    """A RAY_TMPDIR of the test's own for the commands it starts (short: Ray's socket paths
    under it must stay within 107 bytes), so that ray_stop stops their Ray alone; removed
    afterwards."""
    folder = tempfile.mkdtemp(prefix="rayk-", dir="/tmp")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def ray_stop(env: Mapping[str, str]) -> None:
    """Stop the Ray that commands started with `env` left behind (a killed driver's local
    cluster): every process whose environment holds env's RAY_TMPDIR (own_ray), and no other
    Ray of the machine: a sweep or a second test run beside these tests keeps its own."""
    import psutil

    folder = env["RAY_TMPDIR"]
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    victims = []
    for proc in psutil.process_iter():
        try:
            if proc.pid not in mine and proc.environ().get("RAY_TMPDIR") == folder:
                victims.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(victims, timeout=60)


def run_until_then_kill(cmd: list[str], cwd: Path, env: dict, log_path: Path,
                        ready: Callable[[], bool]) -> None:
    """Start `cmd` in its own session (stderr to log_path), wait until ready() holds, then
    SIGKILL its whole process group (a driver dying mid-way) and stop the Ray it left (env
    names its own RAY_TMPDIR: ray_stop).
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
        ray_stop(env)


# S3 (moto) storage, for the tests of remote storage and of sweeps across nodes
BUCKET = "icd-runs"


@pytest.fixture
def s3_env():
    """A moto S3 server on loopback with one bucket; the environment that points boto3,
    pyarrow and every Ray worker at it."""
    from icd_dist.train.ray_session import free_local_port

    port = free_local_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H",
                               "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"}
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                              aws_access_key_id="testing", aws_secret_access_key="testing",
                              region_name="us-east-1")
        for _ in range(100):  # the server takes a moment to listen
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:  # noqa: BLE001 - connection refused until it is up
                assert server.poll() is None, "moto_server exited"
                time.sleep(0.2)
        yield env, client
    finally:
        server.terminate()
        server.wait(timeout=30)


def exists(client, key) -> bool:
    return client.list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount", 0) > 0


def read_json(client, key):
    return json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def upload_folder(client, folder: Path, prefix: str) -> str:
    for path in folder.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(folder)}")
    return f"s3://{BUCKET}/{prefix}"


def make_shards(tmp_path, client) -> tuple[str, str]:
    """The demo's synthetic train/val shards (5 classes, 64x80), built locally and uploaded."""
    from icd_dist.data.synthetic import build_synthetic

    uris = []
    for split, num, seed in (("train", 32, 0), ("val", 8, 1)):
        build_synthetic(tmp_path / split, num, 5, (64, 80), seed=seed, progress=False)
        uris.append(upload_folder(client, tmp_path / split, f"shards/{split}"))
    return uris[0], uris[1]

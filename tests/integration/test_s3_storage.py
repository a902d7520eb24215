"""Remote storage on S3 (moto's server on loopback, started and stopped here): shards read
from the bucket give the same samples as local ones; the demo schedule with its shards and
its run.storage_path in the bucket, killed between its steps, resumed and evaluated from S3."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import ray_stop, run_until_then_kill

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
BUCKET = "icd-runs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_env():
    """A moto S3 server on loopback with one bucket; the environment that points boto3,
    pyarrow and every Ray worker at it."""
    port = free_port()
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


def test_shards_read_from_s3_equal_local(tmp_path, s3_env, monkeypatch):
    from icd_dist.data.torch_pipeline import AugmentConfig, ShardDataset, make_loader

    env, client = s3_env
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, env[key])
    train_uri, _ = make_shards(tmp_path, client)
    augment = AugmentConfig(train=True, crop_size=48)
    local = ShardDataset(tmp_path / "train", None, None, augment, seed=3)
    remote = ShardDataset(train_uri, None, None, augment, seed=3)
    assert remote.remote and len(remote) == len(local) == 32
    for i in (0, 7, 31):
        (image, label, key), (r_image, r_label, r_key) = local[i], remote[i]
        assert key == r_key
        for a, b in ((image, r_image), (label, r_label)):
            assert a.dtype == b.dtype and a.equal(b)
    # Spawned loader workers (object-store clients are not fork-safe) read the same batches.
    batches = [next(iter(make_loader(d, 8, num_workers=1, epoch=1, seed=3)))
               for d in (local, remote)]
    assert batches[0].images.equal(batches[1].images)
    assert batches[0].labels.equal(batches[1].labels)


def test_demo_on_s3_killed_between_steps_resumes_and_evaluates(tmp_path, s3_env):
    env, client = s3_env
    train_uri, val_uri = make_shards(tmp_path, client)
    run = [sys.executable, "-m", "icd_dist.run", "--config", "configs/demo.yaml",
           f"run.storage_path=s3://{BUCKET}/runs", f"data.train_shards={train_uri}",
           f"data.eval_shards={val_uri}", "optim.epochs=2"]
    # Killed once step 0 is finished, on S3.
    run_until_then_kill(run, ROOT, env, tmp_path / "first.log",
                        lambda: exists(client, "runs/demo/step_0/DONE"))
    assert not exists(client, "runs/demo/summary.json")
    step0 = read_json(client, "runs/demo/step_0/metrics.json")
    try:
        second = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=900)
    finally:
        ray_stop()
    assert second.returncode == 0, second.stderr[-4000:]
    assert "step 0: already complete, skipped" in second.stderr
    summary = read_json(client, "runs/demo/summary.json")
    assert [s["step"] for s in summary["steps"]] == [0, 1]
    assert summary["steps"][0] == step0  # taken from S3, not trained again
    assert exists(client, "runs/demo/step_1/model.pt")
    # a finished step keeps no epoch checkpoint; the console and the epoch lines are kept
    assert not exists(client, "runs/demo/step_0/checkpoints/")
    assert not exists(client, "runs/demo/step_1/checkpoints/")
    assert exists(client, "runs/demo/run.log") and exists(client, "runs/demo/step_1/progress.log")

    evaluated = subprocess.run(
        [sys.executable, "-m", "icd_dist.evaluate", "--run", f"s3://{BUCKET}/runs/demo",
         "--data", val_uri, "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["step"] == 1
    for key in ("miou_old", "miou_all", "hiou"):
        assert result[key] == pytest.approx(summary["steps"][1][key], abs=1e-6)

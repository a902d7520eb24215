"""Remote storage: the demo schedule with run.storage_path on S3 (moto's server on loopback,
started and stopped here), killed between its steps, resumed from S3, evaluated from S3."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def ray_stop():
    ray = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray), "stop", "--force"], capture_output=True, timeout=120)


def exists(client, key) -> bool:
    return client.list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount", 0) > 0


def read_json(client, key):
    return json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def test_demo_on_s3_killed_between_steps_resumes_and_evaluates(tmp_path, s3_env):
    env, client = s3_env
    run = [sys.executable, "-m", "icd_dist.run", "--config", "configs/demo.yaml",
           f"run.storage_path=s3://{BUCKET}/runs", f"data.train_shards={tmp_path}/train",
           f"data.eval_shards={tmp_path}/val", "optim.epochs=2", "data.synthetic.num_train=32",
           "data.synthetic.num_eval=8"]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(run, cwd=ROOT, env=env, start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=log)
    try:
        while not exists(client, "runs/demo/step_0/DONE"):  # step 0 finished, on S3
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(1)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        ray_stop()
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
    assert exists(client, "runs/demo/step_1/checkpoints/latest.json")

    evaluated = subprocess.run(
        [sys.executable, "-m", "icd_dist.evaluate", "--run", f"s3://{BUCKET}/runs/demo",
         "--data", f"{tmp_path}/val", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["step"] == 1
    for key in ("miou_old", "miou_all", "hiou"):
        assert result[key] == pytest.approx(summary["steps"][1][key], abs=1e-6)

"""Remote storage on S3 (moto's server on loopback, started and stopped here): shards read
from the bucket give the same samples as local ones; the demo schedule with its shards and
its run.storage_path in the bucket, killed between its steps, resumed and evaluated from S3."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import (
    BUCKET,
    exists,
    make_shards,
    ray_stop,
    read_json,
    run_until_then_kill,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
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


def test_demo_on_s3_killed_between_steps_resumes_and_evaluates(tmp_path, s3_env, own_ray):
    env, client = s3_env
    env = {**env, "RAY_TMPDIR": own_ray}
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
        ray_stop(env)
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

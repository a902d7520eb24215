"""`ray job submit` of the demo to a Ray head started on loopback by the test."""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def ray_cli(env, *args, timeout=600):
    ray = Path(sys.executable).with_name("ray")
    return subprocess.run([str(ray), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_demo_via_ray_job_submit(tmp_path):
    # The token lives only in the subprocesses' environment: Ray caches a token in the
    # process that first uses one, which would break the local clusters of later tests.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    dashboard = "http://127.0.0.1:8277"
    started = ray_cli(env, "start", "--head", "--node-ip-address=127.0.0.1", "--port=6392",
                      "--num-cpus=2", "--dashboard-host=127.0.0.1", "--dashboard-port=8277",
                      "--disable-usage-stats")
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        submitted = ray_cli(
            env, "job", "submit", "--address", dashboard, "--submission-id", "icd-demo",
            "--working-dir", ".", "--", "python", "-m", "icd_dist.run", "--config",
            "configs/demo.yaml", f"run.storage_path={tmp_path}/runs", "optim.epochs=1",
            "data.synthetic.num_train=32", "data.synthetic.num_eval=8")
        assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-3000:]
        status = subprocess.run(
            [sys.executable, "-c", "from ray.job_submission import JobSubmissionClient as C; "
             f"print(C({dashboard!r}).get_job_status('icd-demo').value)"],
            env=env, capture_output=True, text=True, timeout=120)
        assert status.stdout.strip() == "SUCCEEDED", status.stderr[-2000:]
        summary = json.loads((tmp_path / "runs" / "demo" / "summary.json").read_text())
        assert [s["step"] for s in summary["steps"]] == [0, 1]
    finally:
        stopped = ray_cli(env, "stop", "--force")
        assert stopped.returncode == 0

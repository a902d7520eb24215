"""What a researcher sees: the demo's console (tiny budget, with a second Ray instance on the
machine) holds the project's lines only, none twice; skipped bad samples are named once and
counted once; a worker's data error is one line; finished steps keep no epoch checkpoint."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from icd_dist.data.manifest import load_manifest
from icd_dist.data.synthetic import build_synthetic
from icd_dist.train.console import StepFailedError
from icd_dist.train.schedule import run_schedule
from tests.integration.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

# What the demo printed before (Ray's noise, library warnings, forwarded worker output).
NOISE = ["PlacementGroupCleaner", "Failed to query Ray Train Controller",
         "Reporting training result", "Token authentication", "core_worker.cc",
         "PreemptionWatcher", "all_gather_into_tensor", "No CUDA runtime",
         "Found multiple active Ray instances", "Traceback", "(RayTrainWorker",
         "(TrainController", "WARNING", "INFO", "Warning:"]


@pytest.fixture
def other_ray_instance(tmp_path):
    """A second local Ray instance on this machine while the test runs (the demo used to
    print a ConnectionError traceback per step then); stopped by closing its stdin."""
    code = ("import sys, ray; ray.init(address='local', num_cpus=1, include_dashboard=False); "
            "print('up', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "up", "the second Ray did not start"
        yield
    finally:
        proc.stdin.close()  # its ray.shutdown() runs at exit
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)


def test_demo_console_shows_only_the_projects_lines(tmp_path, other_ray_instance):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "icd_dist.run", "--config", "configs/demo.yaml",
         f"run.storage_path={tmp_path}/runs", f"data.train_shards={tmp_path}/data/train",
         f"data.eval_shards={tmp_path}/data/val", "optim.epochs=1",
         "data.synthetic.num_train=32", "data.synthetic.num_eval=8"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    noisy = [ln for ln in lines if any(n in ln for n in NOISE)]
    assert not noisy, "\n".join(noisy)
    repeated = sorted({ln for ln in lines if lines.count(ln) > 1})
    assert not repeated, "\n".join(repeated)
    assert len(lines) <= 40, done.stderr
    for expected in ("step 0: classes 0..3", "step 0 epoch 1/1: seg ",
                     "step 0 done in ", "per-class IoU (%) after step 0:",
                     "step 1: classes 4,", "step 1 epoch 1/1: seg ",
                     "per-class IoU (%) after step 1:", "run demo complete:"):
        assert sum(ln.startswith(expected) for ln in lines) == 1, expected
    header = lines.index("run demo complete:") + 1
    assert lines[header].split()[:8] == ["step", "classes", "images", "old", "new", "all",
                                         "hIoU", "skipped"]
    assert [ln.split()[0] for ln in lines[header + 1:header + 3]] == ["0", "1"]
    assert json.loads(done.stdout)["run"] == "demo"  # stdout: the result line only
    # the run folder keeps what resuming needs, and says its size
    run = tmp_path / "runs" / "demo"
    assert not list(run.glob("step_*/checkpoints"))
    assert re.fullmatch(rf"run folder: {re.escape(str(run))} \(\d+\.\d MB\)", lines[-1])
    assert (run / "run.log").read_text().count("run demo complete:") == 1
    # Ray Train's placement-group cleaner had its State API: nothing about it in Ray's logs
    ray_line = next(ln for ln in lines if ln.startswith("Ray: started a local instance"))
    logs = Path(ray_line.split("Ray's own logs: ", 1)[1])
    for path in logs.glob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert "Failed to query Ray Train Controller" not in text, path
            assert "Found multiple active Ray instances" not in text, path


def corrupt_one_training_sample(tmp_path) -> tuple[str, str]:
    """Tiny synthetic shards with one training image overwritten in place (the shard keeps
    its size, not its checksum); (shard, key) of that sample."""
    build_synthetic(tmp_path / "data" / "train", 32, 4, (48, 48), seed=0, progress=False)
    build_synthetic(tmp_path / "data" / "val", 12, 4, (48, 48), seed=1, progress=False)
    folder = tmp_path / "data" / "train"
    rec = load_manifest(folder).samples[5]
    with open(folder / rec.shard, "r+b") as f:
        f.seek(rec.image[0])
        f.write(b"\x00" * 64)  # the JPEG header gone
    return rec.shard, rec.key


def test_skipped_sample_named_once_and_counted_once(tmp_path, capfd):
    shard, key = corrupt_one_training_sample(tmp_path)
    # in-process: what is checked is the data path and the console, not the workers
    cfg = tiny_config(tmp_path, "run.name=skip", "data.bad_samples=skip", "task.name=offline",
                      "method.name=joint", "optim.epochs=2", "run.keep_checkpoints=true",
                      "engine.launcher=local", "engine.num_workers=1")
    logs = []
    capfd.readouterr()
    summary = run_schedule(cfg, log=logs.append)
    out, _ = capfd.readouterr()
    assert not out.strip(), out[-2000:]  # stdout stays free for `icd_dist.run`'s result line
    lines = [ln for msg in logs for ln in msg.splitlines()]
    step = summary["steps"][0]
    # met in both epochs, counted and named once
    assert step["bad_sample_reads"] == 2 and step["skipped_bad_samples"] == 1
    assert [(b["shard"], b["key"]) for b in step["bad_samples"]] == [(shard, key)]
    assert "corrupt image" in step["bad_samples"][0]["reason"]
    named = [ln for ln in lines if f"sample {key!r}" in ln]
    assert named == [f"  shard {shard}, sample {key!r}: {step['bad_samples'][0]['reason']}"]
    assert "step 0: skipped 1 bad sample (data.bad_samples=skip):" in lines
    assert sum(ln.startswith("warning: bad shards in ") for ln in lines) == 1  # pre-flight
    row = lines[lines.index("run skip complete:") + 2].split()
    assert row[0] == "0" and row[-2] == "1"  # the summary table's skipped column
    run = tmp_path / "runs" / "skip"
    assert json.loads((run / "step_0" / "metrics.json").read_text())["bad_samples"] == \
        step["bad_samples"]
    assert (run / "step_0" / "checkpoints" / "latest.json").is_file()  # keep_checkpoints


def test_worker_data_error_is_one_line(local_ray, tmp_path):
    shard, key = corrupt_one_training_sample(tmp_path)
    # sizes only: the pre-flight lets the shard through, a worker meets the bad sample
    cfg = tiny_config(tmp_path, "run.name=fail", "data.verify=false", "task.name=offline",
                      "method.name=joint", "optim.epochs=1")
    logs = []
    with pytest.raises(StepFailedError) as err:
        run_schedule(cfg, log=logs.append)
    message = str(err.value)
    assert err.value.exit_code == 2 and "\n" not in message
    assert message.startswith(f"step 0: bad input data: shard {shard}, sample {key!r}: "
                              "corrupt image")
    run_log = (tmp_path / "runs" / "fail" / "run.log").read_text()
    assert "Traceback" in run_log and "BadSampleError" in run_log
    assert not any("Traceback" in msg for msg in logs)

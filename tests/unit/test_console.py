"""The driver's console without Ray: progress lines printed once and in order, the step and
run tables, one line for a failed step (its traceback in run.log), skipped samples named once,
checkpoints pruned once a step is DONE, the folder size, Ray's settings, --print-config into
a closed pipe, and entry points whose --help does not load torch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from icd_dist.config import load_config
from icd_dist.data.errors import BadSampleError
from icd_dist.train.checkpoint import EpochCheckpoints
from icd_dist.train.console import RunLog, StepFailedError, step_failure
from icd_dist.train.progress import ProgressFollower, ProgressWriter
from icd_dist.train.ray_session import job_env
from icd_dist.train.report import (
    format_bad_samples,
    format_class_table,
    format_reading,
    format_summary_table,
)
from icd_dist.train.run_folder import RunFolder, folder_bytes, format_bytes
from icd_dist.train.storage import Storage

ROOT = Path(__file__).resolve().parents[2]


def test_progress_lines_printed_once_in_order_after_the_existing_ones(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    writer = ProgressWriter(storage, RunFolder(storage).progress(0))
    writer.write("from an earlier attempt")
    printed = []
    # an hour between polls: only the explicit poll and the final one print
    with ProgressFollower(storage, RunFolder(storage).progress(0), printed.append,
                          interval_s=3600) as f:
        writer.write("epoch 1")
        f.poll()
        f.poll()
        writer.write("epoch 2\nwith a newline")
        with open(storage.path(RunFolder(storage).progress(0)), "a") as half:
            half.write("a line still being written")
        f.poll()
        assert printed == ["epoch 1", "epoch 2 with a newline"]
        with open(storage.path(RunFolder(storage).progress(0)), "a") as half:
            half.write(", now complete\n")
    assert printed == ["epoch 1", "epoch 2 with a newline",
                       "a line still being written, now complete"]


def steps_so_far():
    return [
        {"step": 0, "classes": [0, 1, 2], "train_images": 10, "miou_old": 0.5,
         "miou_new": None, "miou_all": 0.5, "hiou": None, "seconds": 3.0,
         "per_class_iou": {"bg": 0.5, "a": 0.5, "b": None}},
        {"step": 1, "classes": [3], "train_images": 4, "miou_old": 0.5, "miou_new": 0.5,
         "miou_all": 0.5, "hiou": 0.5, "seconds": 2.0, "skipped_bad_samples": 2,
         "per_class_iou": {"bg": 0.5, "a": 0.5, "b": None, "c": 0.5}},
    ]


def test_step_tables_never_repeat_a_line_of_an_earlier_one():
    steps = steps_so_far()
    first = format_class_table(steps[:1], 3).splitlines()
    second = format_class_table(steps, 3).splitlines()
    assert not set(first) & set(second)  # equal IoUs, yet every line differs (a column more)
    assert second[0] == "per-class IoU (%) after step 1:"
    assert second[2].split() == ["0", "bg", "old", "50.00", "50.00"]
    assert second[-1].split() == ["3", "c", "new", "-", "50.00"]


def test_summary_table_shows_skipped_samples():
    table = format_summary_table(steps_so_far()).splitlines()
    assert table[0].split() == ["step", "classes", "images", "old", "new", "all", "hIoU",
                                "skipped", "time", "s"]
    assert table[1].split()[1] == "0..2" and table[1].split()[-2] == "0"
    assert table[2].split()[1] == "3" and table[2].split()[-2] == "2"


def test_reading_names_stability_and_plasticity():
    steps = [{"step": 0, "miou_old": 0.8288, "miou_new": None, "hiou": None},
             {"step": 1, "miou_old": 0.7683, "miou_new": 0.5716, "hiou": 0.6555}]
    text = format_reading(steps)
    assert text.startswith("reading: old classes (stability) 82.88 after step 0 -> 76.83 "
                           "after step 1 (93% of it kept); new classes (plasticity) 57.16; "
                           "hIoU 65.55 weighs both.")
    assert format_reading(steps[:1]) == ""


def test_bad_samples_named_once_each():
    bad = [{"shard": "shard-000000.tar", "key": f"k{i}", "reason": "corrupt image"}
           for i in range(25)]
    lines = format_bad_samples({"step": 1, "bad_samples": bad[:2]})
    assert lines == ["step 1: skipped 2 bad samples (data.bad_samples=skip):",
                     "  shard shard-000000.tar, sample 'k0': corrupt image",
                     "  shard shard-000000.tar, sample 'k1': corrupt image"]
    many = format_bad_samples({"step": 1, "bad_samples": bad})
    assert len(many) == 22 and "5 more, listed in step_1/metrics.json" in many[-1]
    assert format_bad_samples({"step": 0, "bad_samples": []}) == []


def test_skipped_samples_collected_once_however_often_met():
    from icd_dist.data.torch_pipeline import Batch, SkippedSample
    from icd_dist.train.validation import note_bad_samples

    one = SkippedSample("s0.tar", "k1", "corrupt image")
    bad = {}
    for _ in range(3):  # three epochs meet the same sample
        note_bad_samples(bad, Batch(torch.zeros(1), torch.zeros(1), 1, (one,)))
    note_bad_samples(bad, Batch(torch.zeros(1), torch.zeros(1), 0))  # DALI: nothing to name
    assert bad == {("s0.tar", "k1"): "corrupt image"}


def worker_group_error(exc):
    """What TorchTrainer.fit raises when a worker's training function raised `exc` (ray 2.60:
    the worker's exception itself, by rank, and every worker's traceback in the message)."""
    from ray.train import WorkerGroupError

    return WorkerGroupError("Worker 1 failed: Traceback (most recent call last): ... "
                            f"{type(exc).__name__}: {exc}", {1: exc})


def test_worker_data_error_is_one_line_with_traceback_in_run_log(tmp_path):
    printed = []
    log = RunLog(printed.append)
    log.attach(Storage(str(tmp_path / "run")))
    err = step_failure(1, worker_group_error(
        BadSampleError("corrupt image (jpeg)", "000007", "shard-000003.tar")), log)
    assert isinstance(err, StepFailedError) and err.exit_code == 2
    message = str(err)
    assert "\n" not in message
    assert message.startswith("step 1: bad input data: shard shard-000003.tar, sample "
                              "'000007': corrupt image (jpeg)")
    assert message.endswith(f"(traceback in {tmp_path / 'run' / 'run.log'})")
    assert printed == []  # the traceback is not on the console
    logged = (tmp_path / "run" / "run.log").read_text()
    assert "step 1 failed:" in logged and "Worker 1 failed" in logged


def test_data_error_reraised_by_a_loader_worker_keeps_its_line():
    # torch's DataLoader re-raises a worker's exception as type(exc)(its traceback text)
    text = ("Caught BadSampleError in DataLoader worker process 0.\nOriginal Traceback (most "
            "recent call last):\n  File \"x.py\", line 1\nicd_dist.data.errors.BadSampleError: "
            "shard shard-000001.tar, sample 'k9': truncated member\n")
    err = step_failure(0, worker_group_error(BadSampleError(text)), RunLog(lambda m: None))
    assert "step 0: bad input data: shard shard-000001.tar, sample 'k9': truncated member" \
        in str(err)


def test_other_worker_errors_are_one_line_exit_1():
    err = step_failure(2, worker_group_error(RuntimeError("CUDA out of memory.\nmore")),
                       RunLog(lambda m: None))
    assert err.exit_code == 1
    assert str(err).startswith("step 2 failed: RuntimeError: CUDA out of memory. (traceback")


def make_step(storage, step, done, epochs=(3,)):
    for e in epochs:
        storage.write_bytes(f"step_{step}/checkpoints/epoch_{e}/engine/state.pt", b"x" * 4000)
    storage.write_json(f"step_{step}/checkpoints/latest.json", {"epoch": epochs[-1]})
    storage.write_bytes(f"step_{step}/model.pt", b"m" * 1000)
    if done:
        storage.write_bytes(f"step_{step}/DONE", b"done\n")


def test_checkpoints_pruned_once_a_step_is_done(tmp_path):
    storage = Storage(str(tmp_path / "run"))
    make_step(storage, 0, done=True)
    make_step(storage, 1, done=False)
    assert folder_bytes(storage) == 2 * (4000 + 1000 + len('{\n  "epoch": 3\n}')) + 5
    assert EpochCheckpoints(RunFolder(storage), 0).prune()
    assert not (tmp_path / "run" / "step_0" / "checkpoints").exists()
    assert (tmp_path / "run" / "step_0" / "model.pt").is_file()
    assert not EpochCheckpoints(RunFolder(storage), 1).prune()  # unfinished: kept
    assert (tmp_path / "run" / "step_1" / "checkpoints" / "epoch_3").is_dir()
    assert not EpochCheckpoints(RunFolder(storage), 0).prune()  # nothing left to delete
    assert load_config(None).run.keep_checkpoints is False
    assert load_config(None, ["run.keep_checkpoints=true"]).run.keep_checkpoints is True


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 999, 1000, 93_600_000, 2_500_000_000)] == [
        "0 bytes", "999 bytes", "1.0 KB", "93.6 MB", "2.5 GB"]


def test_ray_settings_of_local_and_attached_runs(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config(None, ["engine.device=cpu"])
    local = job_env(cfg, None, "http://127.0.0.1:1234")
    assert local["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"  # worker prints went out twice
    assert local["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert local["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:1234"
    assert local["WANDB_MODE"] == "offline" and "WANDB_API_KEY" not in local
    assert "RAY_ADDRESS" not in local
    attached = job_env(cfg, "10.0.0.1:6379", None)
    assert attached["RAY_ADDRESS"] == "10.0.0.1:6379"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in attached  # a cluster can be drained
    assert "RAY_ADDRESS" not in job_env(cfg, "auto", None)


def test_unreachable_ray_address_is_one_line_at_once():
    from icd_dist.config import ConfigError
    from icd_dist.train.ray_session import check_reachable, free_local_port

    address = f"127.0.0.1:{free_local_port()}"  # nothing listens there
    with pytest.raises(ConfigError) as err:
        check_reachable(address, timeout_s=2)
    assert str(err.value).startswith(f"RAY_ADDRESS: no Ray cluster answers at '{address}'")
    assert "\n" not in str(err.value)
    check_reachable("auto")  # left to Ray


def test_print_config_into_a_closed_pipe_ends_quietly(monkeypatch):
    from icd_dist.cli import print_to_pipe

    read, write = os.pipe()
    os.close(read)  # the reader is gone (`| head` that has read its lines)
    stream = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", stream)
    print_to_pipe("x" * 100_000)  # no BrokenPipeError
    stream.close()


def test_help_of_shards_and_evaluate_does_not_load_torch():
    code = ("import sys, icd_dist.shards, icd_dist.evaluate, icd_dist.tasks; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("step", "error", "message"), [
    (5, ValueError, "step 5: the run has steps 0-1"),
    (1, FileNotFoundError, "step 1 of RUN is not complete (complete steps: 0)")])
def test_evaluate_names_the_steps_a_run_has(tmp_path, step, error, message):
    from icd_dist.config import dump_config
    from icd_dist.data.synthetic import build_synthetic
    from icd_dist.evaluate import evaluate_run

    build_synthetic(tmp_path / "val", 6, 5, (32, 32), progress=False)
    run = Storage(str(tmp_path / "run"))
    cfg = load_config(None, ["data.dataset=synthetic", "data.synthetic.classes=5",
                             "task.name=3-1"])
    run.write_bytes("config.yaml", dump_config(cfg).encode())
    run.write_bytes("step_0/DONE", b"done\n")
    with pytest.raises(error) as err:
        evaluate_run(run.uri(), str(tmp_path / "val"), step)
    assert message.replace("RUN", run.uri()) in str(err.value)


def test_shards_inspect_says_the_dataset_once_and_a_single_class_as_such(tmp_path, capsys):
    from icd_dist import shards as shards_cli
    from icd_dist.data.synthetic import build_synthetic

    build_synthetic(tmp_path / "s", 12, 5, (32, 32), progress=False)
    assert shards_cli.main(["inspect", str(tmp_path / "s"), "--task", "3-1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("synthetic: 12 samples in 1 shards")
    assert out[-2].endswith("classes 0..3") and out[-1].endswith(" images, class 4")

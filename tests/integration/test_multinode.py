"""Several nodes on one machine: Ray's own simulated cluster (`ray.cluster_utils.Cluster`:
a head and worker raylets, each with its own object store and logical CPUs) runs the
schedule as a real cluster would (the driver attaches through RAY_ADDRESS, as under `ray job
submit`). What the workers report in metrics.json says where they ran and how the teacher
reached them (step_worker.StepTrainer._placement).

These tests are marked `multinode` and run as CI's second stage (`python -m pytest -q -m
multinode`): they stop no other Ray and no other Ray may run beside them."""

import contextlib
import os

import pytest

from icd_dist.train.schedule import run_schedule
from tests.integration.conftest import BUCKET, exists, make_shards, read_json, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.multinode]


@contextlib.contextmanager
def simulated_cluster(*worker_node_cpus: int):
    """A head without CPUs (training never lands on it, as on cluster/aws.yaml) and one
    worker node per entry with that many logical CPUs; RAY_ADDRESS points at it. Yields
    (cluster, head node id, worker node ids); shuts every node down afterwards."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    saved = os.environ.get("RAY_ADDRESS")
    try:
        nodes = [cluster.add_node(num_cpus=cpus) for cpus in worker_node_cpus]
        cluster.wait_for_nodes()
        os.environ["RAY_ADDRESS"] = cluster.address
        yield cluster, cluster.head_node.node_id, [n.node_id for n in nodes]
    finally:
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
        cluster.shutdown()


def test_two_workers_on_two_nodes_train_what_two_workers_on_one_node_train(tmp_path):
    """The same seed, once with both workers on one node (STRICT_PACK) and once with one per
    node (STRICT_SPREAD): the same loss curve and the same weights at every step."""
    runs = {}
    with simulated_cluster(2, 2) as (_, head, workers):
        for strategy in ("STRICT_PACK", "STRICT_SPREAD"):
            cfg = tiny_config(tmp_path, f"run.name={strategy}", "engine.engine=ddp",
                              f"engine.placement_strategy={strategy}", "optim.epochs=1")
            runs[strategy] = run_schedule(cfg, log=lambda m: None)["steps"]
    for step in runs["STRICT_PACK"]:  # where the workers ran, as observed
        assert len(set(step["worker_nodes"])) == 1 and step["worker_nodes"][0] in workers
    for step in runs["STRICT_SPREAD"]:
        assert sorted(step["worker_nodes"]) == sorted(workers)
    for one, two in zip(runs["STRICT_PACK"], runs["STRICT_SPREAD"], strict=True):
        assert one["loss_curve"] == two["loss_curve"] and len(one["loss_curve"]) > 0
        assert one["student_digests"] == two["student_digests"]
    assert head not in {n for s in runs["STRICT_SPREAD"] for n in s["worker_nodes"]}


def test_the_teacher_is_held_once_per_node_and_mapped_by_every_worker(tmp_path):
    """Two workers on each of two nodes (and a head that runs none): at step 1 the teacher's
    arrays are in the object store of exactly the two nodes with workers, and every worker's
    teacher IS those shared arrays (no private copy)."""
    with simulated_cluster(2, 2) as (_, head, workers):
        cfg = tiny_config(tmp_path, "engine.engine=ddp", "engine.num_workers=4",
                          "optim.epochs=1", "optim.batch_size=8")
        steps = run_schedule(cfg, log=lambda m: None)["steps"]
    step1 = steps[1]
    assert sorted(set(step1["worker_nodes"])) == sorted(workers)
    assert sorted(step1["worker_nodes"]).count(workers[0]) == 2
    assert sorted(step1["teacher_nodes"]) == sorted(workers) and head not in step1["teacher_nodes"]
    assert step1["teacher_zero_copy"] == [True] * 4
    assert steps[0]["teacher_zero_copy"] == [None] * 4  # step 0 has no teacher


def test_ray_job_submit_to_the_clusters_head_runs_the_demo_on_its_worker_nodes(tmp_path):
    """`ray job submit` to the head's job server (its dashboard): the demo's driver runs on
    the head, its two workers on the two worker nodes (one CPU each), and its results land
    in the configured run.storage_path."""
    import json
    import subprocess
    import sys
    import time
    from pathlib import Path

    from ray.cluster_utils import Cluster

    from icd_dist.train.ray_session import free_local_port

    root = Path(__file__).resolve().parents[2]
    port = free_local_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": port})
    try:
        workers = [cluster.add_node(num_cpus=1).node_id for _ in range(2)]
        cluster.wait_for_nodes()
        address = f"http://127.0.0.1:{port}"
        ray_cli = Path(sys.executable).with_name("ray")
        submit = [str(ray_cli), "job", "submit", "--address", address, "--submission-id",
                  "icd-demo", "--working-dir", ".", "--", "python", "-m", "icd_dist.run",
                  "--config", "configs/demo.yaml", f"run.storage_path={tmp_path}/runs",
                  f"data.train_shards={tmp_path}/data/train",
                  f"data.eval_shards={tmp_path}/data/val", "optim.epochs=1",
                  "data.synthetic.num_train=32", "data.synthetic.num_eval=8",
                  "logging.wandb=disabled"]
        # The head's job agent registers some time after the dashboard answers (long on a
        # loaded machine); until then the job server refuses the submission, and nothing ran.
        for _ in range(150):
            submitted = subprocess.run(submit, cwd=root, capture_output=True, text=True,
                                       timeout=900)
            if "No available agent to submit job" not in submitted.stderr:
                break
            time.sleep(2)
        assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-3000:]
        from ray.job_submission import JobSubmissionClient

        assert JobSubmissionClient(address).get_job_status("icd-demo").value == "SUCCEEDED"
    finally:
        cluster.shutdown()
    summary = json.loads((tmp_path / "runs" / "demo" / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [0, 1]
    for step in summary["steps"]:
        metrics = json.loads((tmp_path / "runs" / "demo" / f"step_{step['step']}" /
                              "metrics.json").read_text())
        assert sorted(metrics["worker_nodes"]) == sorted(workers)


def _run_in_thread(cfg):
    """run_schedule(cfg) in the driver's fit thread class (launcher.FitThread: it keeps what
    was raised); returns (thread, dict that gets "summary" when it ends)."""
    from icd_dist.train.launcher import FitThread

    out: dict = {}
    thread = FitThread(lambda: out.update(summary=run_schedule(cfg, log=lambda m: None)))
    thread.start()
    return thread, out


def _wait_for(path, thread):
    """Block until `path` exists (a worker's hold marker); fail if the run ends first."""
    import time

    while not path.exists():
        assert thread.is_alive(), "the run ended before the worker held"
        time.sleep(0.5)
    return path.read_text()


def test_a_node_lost_mid_step_is_replaced_and_the_step_ends_bit_identical(tmp_path,
                                                                          monkeypatch):
    """One worker per node, 1 CPU each. Rank 1 holds at the start of step 1's epoch 3 (the
    hook writes its node id), the test removes that node and adds a new one: Ray Train
    starts the worker group again on the new node, the step resumes from its epoch-2
    checkpoint, and the schedule ends with the weights of the uninterrupted run."""
    from icd_dist.train.plan import FAILURE_ENV

    base = ["engine.engine=ddp", "optim.epochs=1", "optim.epochs_incremental=4",
            "engine.max_failures=1"]
    with simulated_cluster(1, 1) as (cluster, _, workers):
        straight = run_schedule(tiny_config(tmp_path, "run.name=straight", *base),
                                log=lambda m: None)["steps"]
        monkeypatch.setenv(FAILURE_ENV, "1:2:1:hold")
        thread, out = _run_in_thread(tiny_config(tmp_path, "run.name=lost", *base))
        held = _wait_for(tmp_path / "runs" / "lost" / "failures" / "failed_1_2_1", thread)
        assert held in workers
        lost = next(n for n in cluster.worker_nodes if n.node_id == held)
        cluster.remove_node(lost)
        replacement = cluster.add_node(num_cpus=1)
        thread.join(timeout=600)
    assert thread.error is None, thread.error
    steps = out["summary"]["steps"]
    assert steps[1]["resumed_from_epoch"] == 2
    assert replacement.node_id in steps[1]["worker_nodes"] and held not in steps[1]["worker_nodes"]
    for a, b in zip(straight, steps, strict=True):
        assert a["student_digests"] == b["student_digests"]
        assert a["loss_curve"] == b["loss_curve"]


def test_a_node_lost_with_no_replacement_stops_the_run_with_one_line(tmp_path, monkeypatch):
    """The same loss with no node to replace it: Ray Train would wait for a placement
    forever; the run stops after engine.node_loss_timeout_s with one line naming the lost
    node and what to do."""
    from icd_dist.train.console import StepFailedError
    from icd_dist.train.plan import FAILURE_ENV

    with simulated_cluster(1, 1) as (cluster, _, workers):
        monkeypatch.setenv(FAILURE_ENV, "1:1:1:hold")
        thread, _ = _run_in_thread(tiny_config(
            tmp_path, "run.name=lost", "engine.engine=ddp", "optim.epochs=1",
            "optim.epochs_incremental=3", "engine.max_failures=1",
            "engine.node_loss_timeout_s=10"))
        held = _wait_for(tmp_path / "runs" / "lost" / "failures" / "failed_1_1_1", thread)
        cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == held))
        thread.join(timeout=120)  # the bound is 10 s
        assert not thread.is_alive(), "the run still waits for the lost node"
    error = thread.error
    assert isinstance(error, StepFailedError), error
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"step 1: node {held} was lost and no node took its workers' "
                              "place within 10 s (engine.node_loss_timeout_s); add a node")
    assert not (tmp_path / "runs" / "lost" / "step_1" / "DONE").exists()


def test_the_teacher_board_lives_on_the_drivers_node():
    """The board through which ranks find the teacher is the driver's, on the driver's node
    (the head here): losing a worker node must not take it along (with Ray's default or a
    soft affinity, some boards landed on worker nodes)."""
    import ray
    from ray.util.state import list_actors

    from icd_dist.train.teacher_board import make_board

    with simulated_cluster(1, 1) as (cluster, head, _):
        ray.init(address=cluster.address)
        try:
            boards = [make_board() for _ in range(6)]
            ray.get([b.post.remote(1, [None]) for b in boards])
            nodes = {a.node_id for a in list_actors(
                filters=[("class_name", "=", "TeacherBoard"), ("state", "=", "ALIVE")])}
        finally:
            ray.shutdown()
    assert nodes == {head}


def test_a_sweep_across_nodes_trains_step0_once_and_keeps_everything_in_the_bucket(
        tmp_path, monkeypatch, s3_env):
    """Real nodes share no disk: shards, the step-0 cache, the trials and the sweep's results
    on S3 (moto). Two trials, one per worker node (one CPU each): step 0 is trained once, by
    the driver on the head, and both trials read it from the bucket."""
    env, client = s3_env
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_DEFAULT_REGION", "WANDB_MODE"):
        monkeypatch.setenv(key, env[key])  # before the nodes start: their workers read it
    train_uri, val_uri = make_shards(tmp_path, client)
    from icd_dist.config import load_config
    from icd_dist.train.sweep import run_sweep

    cfg = load_config("configs/tune/demo.yaml", [
        f"run.storage_path=s3://{BUCKET}/sweeps", f"data.train_shards={train_uri}",
        f"data.eval_shards={val_uri}", "optim.epochs=1", "tune.num_samples=2",
        "tune.scheduler=none", "engine.cpus_per_worker=0.95", "logging.wandb=disabled"])
    with simulated_cluster(1, 1) as (_, head, workers):
        summary = run_sweep(cfg, log=lambda m: None)
    assert summary["step0"]["trainings_run"] == 1 and summary["step0"]["reused"] == 2
    key = next(iter(summary["step0"]["keys"]))
    assert exists(client, f"sweeps/step0_cache/{key}/step_0/DONE")
    shared = read_json(client, f"sweeps/step0_cache/{key}/step_0/metrics.json")
    nodes = []
    for trial in summary["trials"]:
        assert trial["status"] == "finished", trial
        folder = f"sweeps/tune-demo/trials/{trial['trial_id']}"
        # its step 0 is the cached one, copied from the bucket, not trained again
        assert read_json(client, f"{folder}/step_0/metrics.json") == shared
        nodes += read_json(client, f"{folder}/step_1/metrics.json")["worker_nodes"]
    assert sorted(nodes) == sorted(workers)  # one trial on each worker node
    for name in ("tune_summary.json", "best.yaml", "config.yaml"):
        assert exists(client, f"sweeps/tune-demo/{name}"), name

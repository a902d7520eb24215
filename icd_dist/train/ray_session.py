"""Starting or attaching to Ray for a run, with Ray's own chatter kept off the console.

Each setting switches a message off where Ray produces it (ray 2.60):
- `log_to_driver=False`: what Ray's workers and actors print (the Train controller's status
  lines, its per-report INFO lines, torch's and DeepSpeed's warnings; a sweep's trials) stays
  in Ray's log folder, which the console names; a run's own progress reaches the driver
  through the run folder (`train/progress.py`), a sweep's trials' results through Tune
  (`train/sweep_console.py`).
- `RAY_TRAIN_ENABLE_PRINT_PATCH=0`: Ray Train sends every worker `print()` to its logger,
  which writes it to the worker's stderr, besides the worker's redirected stdout: each line
  was written, and forwarded, twice.
- The State API and its address: Ray Train's PlacementGroupCleaner asks the State API every
  second whether the controller is alive. Without the dashboard (which serves that API) it
  warned each time ("Failed to query Ray Train Controller actor state"); with several Ray
  instances on the machine it could not tell which one to ask and died with a
  ConnectionError traceback. A local instance gets the dashboard on a free loopback port and
  its processes `RAY_API_SERVER_ADDRESS`; an attached cluster's processes get `RAY_ADDRESS`.
- `RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0` on a local instance: no autoscaler drains a local
  node, and the watcher's creation logged a core_worker error for every step.
- Ray's token-authentication module logs at ERROR only while a local instance starts: Ray
  turns token authentication on for it by default and warned that it had (the mode is
  unchanged; RAY_AUTH_MODE still overrides it).
- `logging_level=WARNING` for the driver's `ray` logger: no INFO lines at start-up.

Where the cluster is: `RAY_ADDRESS` (as `ray job submit` sets it) attaches to that cluster;
without it a new local instance starts (`address="local"`), never a guess among instances
already running on the machine.
"""

from __future__ import annotations

import logging
import os
import socket

from icd_dist.config import Config, ConfigError

# Environment of every process of the job (driver-side Ray Train reads them too).
QUIET_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# Passed on from the driver's environment to the workers when set.
PASSED_ENV = ("WANDB_MODE", "WANDB_API_KEY", "ICD_DIST_INJECT_FAILURE")
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def free_local_port() -> int:
    """A TCP port free on loopback now (for the dashboard of a local instance)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """ConfigError (one line) unless something listens at a host:port RAY_ADDRESS: Ray itself
    would retry for minutes, printing a warning every few seconds. Other forms ("auto",
    "ray://...") are left to Ray."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError("RAY_ADDRESS", f"no Ray cluster answers at {address!r} ({exc}); "
                          "unset RAY_ADDRESS to start a local Ray") from None


def workers_get_no_gpu(cfg: Config, address: str | None) -> bool:
    """Whether it is certain before Ray starts that no worker gets a GPU: engine.device=cpu,
    or auto on a local instance of a machine without CUDA. An attached cluster's GPUs are not
    known yet (the workers set DeepSpeed's accelerator themselves: train/engine.py)."""
    import torch

    if cfg.engine.device == "cpu":
        return True
    return cfg.engine.device == "auto" and address is None and not torch.cuda.is_available()


def job_env(cfg: Config, address: str | None, api_server: str | None) -> dict[str, str]:
    """The environment variables of the job's processes (see the module docstring).
    `address`: the cluster's RAY_ADDRESS when attaching; `api_server`: the State API of a
    local instance. DS_ACCELERATOR=cpu only where no worker gets a GPU."""
    env = dict(QUIET_ENV)
    if workers_get_no_gpu(cfg, address):
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
    for key in PASSED_ENV:
        if key in os.environ:
            env[key] = os.environ[key]
    if address is None:
        env.update(LOCAL_ENV)
        if api_server:
            env["RAY_API_SERVER_ADDRESS"] = api_server
    elif "://" not in address and address not in ("auto", "local"):
        env["RAY_ADDRESS"] = address  # host:port of the cluster's GCS
    return env


def init_ray(cfg: Config) -> bool:
    """Attach to RAY_ADDRESS's cluster or start a local one (see the module docstring);
    True if this call started Ray (the caller shuts it down). What workers print stays in
    Ray's logs. ConfigError with one line if RAY_ADDRESS names no reachable cluster."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    common = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:
        port = free_local_port()
        auth_logger = logging.getLogger(AUTH_LOGGER)
        level = auth_logger.level
        auth_logger.setLevel(logging.ERROR)
        try:
            ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=port,
                     runtime_env={"env_vars": job_env(cfg, None, f"http://127.0.0.1:{port}")},
                     **common)
        finally:
            auth_logger.setLevel(level)
        return True
    check_reachable(address)
    try:
        ray.init(address=address, runtime_env={"env_vars": job_env(cfg, address, None)},
                 **common)
    except ConnectionError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("RAY_ADDRESS", f"cannot attach to the Ray cluster at {address!r}: "
                          f"{first} (unset RAY_ADDRESS to start a local Ray)") from None
    return True


def describe_ray() -> str:
    """One line: which Ray this run uses (after init_ray), its resources, and where Ray's own
    logs are."""
    import ray

    if not ray.is_initialized():
        return "Ray: not started"
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    address = os.environ.get("RAY_ADDRESS")
    what = f"attached to the cluster at {address}" if address else "started a local instance"
    text = f"Ray: {what} ({cpus} CPUs, {gpus} GPUs)"
    logs = _logs_dir()
    return f"{text}; Ray's own logs: {logs}" if logs else text


def _logs_dir() -> str | None:
    """This node's Ray log folder (worker and controller output), if Ray tells."""
    try:
        import ray

        node = ray._private.worker._global_node  # no public API names it
        return node.get_logs_dir_path() if node is not None else None
    except Exception:  # noqa: BLE001 - a private attribute: naming the folder is optional
        return None

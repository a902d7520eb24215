"""One command for a GPU machine: the checks that need CUDA, run in one go, written to one JSON.

Four parts, each a subprocess with its own time limit (one failing does not stop the others):
  cuda_tests  every test marked `cuda` (pytest -m cuda over tests/), counted from its JUnit XML
  loss_bench  tools/bench_loss.py --device cuda: the ICD losses fwd+bwd, Triton vs compiled vs
              eager, each against a device-to-device copy's bandwidth, peak extra memory
  data_bench  tools/bench_data.py --dali-device gpu: DALI decoding/augmenting on the GPU vs
              the torch pipeline and a plain DataLoader, batches timed onto the GPU
  run         python -m icd_dist.run on a VOC-shaped config (configs/voc/15-1_icd.yaml: a
              DeepLabV3-ResNet-101, 21 classes, crop 512, 15-1 stopped after its first
              incremental step) on synthetic data, in bf16 (DeepSpeed, bf16 teacher), DALI on
              the GPU, 1 worker with gradient accumulation 2, a small iteration budget

It prints a table (part, status, seconds, key numbers) and writes one JSON (default
tools/results/gpu_check/<device-name>.json): device, CUDA and driver, the versions of torch,
Triton, DeepSpeed, Ray and DALI, and per part its command, status, return code, seconds, the
tail of its output and the numbers read from its outputs. When that file already holds a
report from the same device, the parts not run this time are kept (so the parts can run in
separate commands). Exit status 0 when every part run is ok, 1 otherwise, 2 without CUDA.

    python tools/gpu_check.py [--parts cuda_tests,loss_bench,data_bench,run] [--quick]
                              [--out FILE] [--workdir DIR] [--keep] [--timeout S] [--dry-run]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tools" / "results" / "gpu_check"
PARTS = ("cuda_tests", "loss_bench", "data_bench", "run")
RUN_CONFIG = "configs/voc/15-1_icd.yaml"
TAIL_CHARS = 4000
RUN_BATCH = 4  # the run's global batch (optim.batch_size): micro-batch 2 x accumulation 2
# Seconds per part: (full, --quick). The first call compiles Triton/inductor kernels.
TIMEOUTS = {"cuda_tests": (900, 450), "loss_bench": (600, 300), "data_bench": (600, 300),
            "run": (1200, 600)}


@dataclass
class Part:
    """One check: the command that runs it and where its results land."""

    name: str
    command: list[str]
    timeout: float
    needs: tuple[str, ...]  # modules that must be importable for the part to run at all
    outputs: dict[str, Path] = field(default_factory=dict)  # files the part writes
    env: dict[str, str] = field(default_factory=dict)
    what: str = ""


@dataclass
class Outcome:
    """What running a part's command gave."""

    returncode: int | None  # None: killed at its time limit
    seconds: float
    output: str  # stdout and stderr, interleaved


@dataclass
class PartResult:
    name: str
    status: str  # ok | failed | timeout | unavailable
    returncode: int | None
    seconds: float
    command: list[str]
    output_tail: str
    numbers: dict
    reason: str | None = None

    def to_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "returncode": self.returncode,
                "seconds": round(self.seconds, 2), "command": shlex.join(self.command),
                "numbers": self.numbers, "output_tail": self.output_tail}


# --------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------


def run_overrides(workdir: Path, quick: bool) -> list[str]:
    """The key=value overrides that turn configs/voc/15-1_icd.yaml into the GPU check's run:
    synthetic VOC-shaped data (21 classes, 500x375 images), no pretrained weights, bf16
    (DeepSpeed and the teacher), DALI on the GPU, 1 worker, micro-batch 2 x accumulation 2."""
    return [
        "run.name=gpu_check",
        f"run.storage_path={workdir / 'runs'}",
        "data.dataset=synthetic",
        f"data.train_shards={workdir / 'data' / 'train'}",
        f"data.eval_shards={workdir / 'data' / 'val'}",
        "data.synthetic.classes=21",
        f"data.synthetic.num_train={48 if quick else 96}",
        "data.synthetic.num_eval=16",
        "data.synthetic.height=375",
        "data.synthetic.width=500",
        "data.crop_size=512",
        "data.eval_size=512",
        "data.pipeline=dali",
        "model.pretrained=none",
        "engine.device=cuda",
        "engine.num_workers=1",
        "engine.precision=bf16",
        "engine.teacher_dtype=bf16",
        f"optim.batch_size={RUN_BATCH}",
        "engine.micro_batch_size=2",
        f"optim.iterations={4 if quick else 20}",
        f"optim.iterations_incremental={4 if quick else 10}",
        "eval.batch_size=4",
        "logging.wandb=disabled",
    ]


def build_parts(workdir: Path, quick: bool = False, python: str = sys.executable,
                timeout: float | None = None) -> dict[str, Part]:
    """Every part's command, in order; outputs go under `workdir`."""

    def limit(name: str) -> float:
        return timeout if timeout else TIMEOUTS[name][1 if quick else 0]

    tests_xml = workdir / "cuda_tests.xml"
    loss_json = workdir / "bench_loss.json"
    data_json = workdir / "bench_data.json"
    loss_size = ["--batch", "4", "--repeats", "3"] if quick else []
    data_size = ["--images", "128", "--rounds", "2"] if quick else ["--images", "512",
                                                                    "--rounds", "3"]
    parts = [
        Part("cuda_tests",
             [python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
              "--continue-on-collection-errors", "-rfEs", f"--junitxml={tests_xml}", "tests"],
             limit("cuda_tests"), ("pytest", "torch"), {"junit": tests_xml},
             what="every test marked cuda"),
        Part("loss_bench",
             [python, "tools/bench_loss.py", "--device", "cuda", *loss_size,
              "--out", str(loss_json)],
             limit("loss_bench"), ("torch", "triton", "psutil"), {"json": loss_json},
             what="ICD losses: Triton / compiled / eager vs a device-to-device copy"),
        Part("data_bench",
             [python, "tools/bench_data.py", "--dali-device", "gpu", *data_size,
              "--out", str(data_json)],
             limit("data_bench"), ("torch", "nvidia.dali", "torchvision"), {"json": data_json},
             what="input pipelines, DALI on the GPU"),
        Part("run",
             [python, "-m", "icd_dist.run", "--config", RUN_CONFIG, "--last-step", "1",
              *run_overrides(workdir, quick)],
             limit("run"), ("torch", "ray", "deepspeed", "nvidia.dali"),
             {"runs": workdir / "runs"}, env={"WANDB_MODE": "disabled"},
             what="2 steps of VOC 15-1 (ICD), synthetic data, bf16, DALI, 1 worker"),
    ]
    return {p.name: p for p in parts}


# --------------------------------------------------------------------------------------
# Reading each part's results
# --------------------------------------------------------------------------------------


def parse_cuda_tests(part: Part, output: str) -> tuple[dict, str | None]:
    """Counts from the JUnit XML; a problem when a test failed or errored (a module that could
    not be imported included) or when no test ran."""
    path = part.outputs["junit"]
    if not path.is_file():
        return {}, "pytest wrote no JUnit XML"
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites)
              for k in ("tests", "failures", "errors", "skipped")}
    failed, skipped = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        sk = case.find("skipped")
        if sk is not None:
            skipped.append(f"{name}: {sk.get('message', '')}"[:200])
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    numbers = {"passed": passed, "failed": counts["failures"], "errors": counts["errors"],
               "skipped": counts["skipped"], "failed_tests": failed[:20],
               "skipped_tests": skipped[:10]}
    if counts["failures"] or counts["errors"]:
        return numbers, f"{counts['failures']} failed, {counts['errors']} errors " \
                        f"(first: {(failed or ['?'])[0]})"
    if passed <= 0:
        return numbers, "no cuda test ran"
    return numbers, None


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def parse_loss_bench(part: Part, output: str) -> tuple[dict, str | None]:
    """Per implementation: ms, speed-up and memory against eager, fraction of the copy's
    bandwidth; a problem when Triton did not run or a loss is not finite."""
    path = part.outputs["json"]
    if not path.is_file():
        return {}, "bench_loss.py wrote no JSON"
    data = json.loads(path.read_text())
    bw = data.get("copy_bandwidth_bytes_per_s")
    numbers: dict = {"device": data.get("device"), "dtype": data.get("dtype"),
                     "batch": data.get("batch"), "crop": data.get("crop"),
                     "tap_mib": round(data.get("tap_bytes", 0) / 2**20, 1),
                     "copy_gb_per_s": round(bw / 1e9, 1) if bw else None, "impls": {}}
    problems = []
    for row in data.get("results", []):
        if "skipped" in row:
            numbers["impls"][row["impl"]] = {"skipped": row["skipped"]}
            problems.append(f"{row['impl']} skipped: {row['skipped']}")
            continue
        r = {"ms": round(row["seconds"] * 1e3, 3),
             "speedup_vs_eager": round(row.get("speedup_vs_eager", float("nan")), 3),
             "peak_extra_mib": round(row["peak_extra_bytes"] / 2**20, 1),
             "memory_vs_eager": round(row.get("memory_vs_eager", float("nan")), 3),
             "fraction_of_copy_bandwidth": round(row["bandwidth_fraction_of_copy"], 3)
             if "bandwidth_fraction_of_copy" in row else None,
             "first_call_s": round(row["warmup_seconds"], 2),
             "loss_int": row["loss_int"], "loss_ext": row["loss_ext"]}
        if not _finite(row["loss_int"], row["loss_ext"]):
            problems.append(f"{row['impl']}: loss not finite")
        numbers["impls"][row["impl"]] = r
    if "triton" not in numbers["impls"]:
        problems.append("triton was not timed")
    if not bw:
        problems.append("no device-to-device copy bandwidth")
    return numbers, "; ".join(problems) or None


def parse_data_bench(part: Part, output: str) -> tuple[dict, str | None]:
    """Images/s per input and pipeline; a problem when DALI did not run on the GPU."""
    path = part.outputs["json"]
    if not path.is_file():
        return {}, "bench_data.py wrote no JSON"
    data = json.loads(path.read_text())
    env = data.get("env", {})
    numbers: dict = {"device": env.get("device"), "workers": env.get("workers"),
                     "batch": env.get("batch"), "inputs": {}}
    problems = []
    for row in data.get("results", []):
        rates = {k: round(row[k], 1) for k in ("dali_gpu", "dali_cpu", "torch", "plain")
                 if k in row}
        if "dali_gpu" in row and row.get("torch"):
            rates["dali_gpu_vs_torch"] = round(row["dali_gpu"] / row["torch"], 2)
        numbers["inputs"][f"{row['input']} {row['size']}"] = rates
        if not row.get("dali_gpu", 0) > 0:
            problems.append(f"{row['input']}: no DALI-GPU rate")
    if not numbers["inputs"]:
        problems.append("no results")
    return numbers, "; ".join(problems) or None


def parse_run(part: Part, output: str) -> tuple[dict, str | None]:
    """The run's final line and each step's metrics.json: seconds, iterations, images/s,
    first and last loss, mIoU; a problem when a step is missing or a loss is not finite."""
    numbers: dict = {"steps": []}
    for line in reversed(output.splitlines()):
        try:
            final = json.loads(line)
        except ValueError:
            continue
        if isinstance(final, dict) and "run" in final:
            numbers.update({k: final[k] for k in ("final_miou_all", "final_hiou") if k in final})
            break
    problems = []
    runs = part.outputs["runs"]
    files = sorted(runs.glob("*/step_*/metrics.json")) if runs.is_dir() else []
    for f in files:
        m = json.loads(f.read_text())
        curve = m.get("loss_curve") or []
        step = {"step": m.get("step"), "seconds": round(m.get("seconds", 0.0), 2),
                "iterations": m.get("iterations"), "train_images": m.get("train_images"),
                "loss_first": curve[0] if curve else None,
                "loss_last": curve[-1] if curve else None,
                "miou_all": m.get("miou_all"), "engine": m.get("engine")}
        if m.get("seconds") and m.get("iterations"):
            step["images_per_s"] = round(RUN_BATCH * m["iterations"] / m["seconds"], 2)
        if not curve or not _finite(*curve):
            problems.append(f"step {m.get('step')}: loss curve empty or not finite")
        numbers["steps"].append(step)
    if len(files) < 2:
        problems.append(f"{len(files)} of 2 steps finished")
    return numbers, "; ".join(problems) or None


PARSERS: dict[str, Callable[[Part, str], tuple[dict, str | None]]] = {
    "cuda_tests": parse_cuda_tests, "loss_bench": parse_loss_bench,
    "data_bench": parse_data_bench, "run": parse_run}


def missing_modules(part: Part) -> list[str]:
    """The modules of `part.needs` that cannot be imported here."""
    missing = []
    for name in part.needs:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def judge(part: Part, outcome: Outcome) -> PartResult:
    """The result of a part from its command's outcome and the files it wrote."""
    tail = outcome.output[-TAIL_CHARS:]
    try:
        numbers, problem = PARSERS[part.name](part, outcome.output)
    except Exception as exc:  # noqa: BLE001 - a broken output file is a finding, not a crash
        numbers, problem = {}, f"could not read its results: {type(exc).__name__}: {exc}"
    if outcome.returncode is None:
        status, reason = "timeout", f"killed after {part.timeout:.0f} s"
    elif outcome.returncode != 0:
        status, reason = "failed", f"exit status {outcome.returncode}" + \
            (f"; {problem}" if problem else "")
    elif problem:
        status, reason = "failed", problem
    else:
        status, reason = "ok", None
    return PartResult(part.name, status, outcome.returncode, outcome.seconds, part.command,
                      tail, numbers, reason)


def run_command(part: Part) -> Outcome:
    """Run the part's command from the repository root, output to a file, in its own process
    group, which is killed (SIGKILL) at the time limit."""
    env = {**os.environ, **part.env, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                      os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryFile("w+", errors="replace") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(part.command, cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=part.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        seconds = time.perf_counter() - start
        log.seek(0)
        return Outcome(rc, seconds, log.read())


# --------------------------------------------------------------------------------------
# Device, versions, the report
# --------------------------------------------------------------------------------------


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    """Versions of what the checks use (None: not installed), read from package metadata."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
            else None,
            "triton": _dist_version("triton", "pytorch-triton"),
            "deepspeed": _dist_version("deepspeed"), "ray": _dist_version("ray"),
            "dali": _dist_version("nvidia-dali-cuda120", "nvidia-dali-cuda130",
                                  "nvidia-dali-cuda110", "nvidia-dali"),
            "torchvision": _dist_version("torchvision"), "numpy": _dist_version("numpy")}


def device_info() -> dict:
    """GPU 0 as torch and nvidia-smi see it."""
    import torch

    props = torch.cuda.get_device_properties(0)
    info = {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "gpus_visible": torch.cuda.device_count(), "bf16": torch.cuda.is_bf16_supported(),
            "driver": None, "host": platform.node(), "cpus": os.cpu_count()}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                              "-i", "0"], capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            info["driver"] = out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def git_commit() -> dict | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "uncommitted_changes": bool(dirty.stdout.strip())}


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def assemble_report(device: dict, vers: dict, results: list[PartResult], argv: list[str],
                    previous: dict | None = None, git: dict | None = None) -> dict:
    """The JSON document: this run's parts, plus the parts of `previous` (an earlier report of
    the same device) that were not run this time."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    parts: dict[str, dict] = {}
    if previous and previous.get("device", {}).get("name") == device.get("name"):
        parts.update(previous.get("parts", {}))
    for r in results:
        parts[r.name] = {**r.to_dict(), "finished": now}
    ordered = {name: parts[name] for name in PARTS if name in parts}
    return {"tool": "tools/gpu_check.py", "created": now,
            "command": shlex.join(["python", "tools/gpu_check.py", *argv]),
            "device": device, "versions": vers, "git": git,
            "ok": set(ordered) == set(PARTS) and all(p["status"] == "ok"
                                                     for p in ordered.values()),
            "parts": ordered}


def exit_code(results: list[PartResult]) -> int:
    """0 when every part run is ok, else 1."""
    return 0 if results and all(r.status == "ok" for r in results) else 1


def summary(r: PartResult) -> str:
    """The key numbers of a part in one line."""
    n = r.numbers
    try:
        if r.name == "cuda_tests" and n:
            return f"{n['passed']} passed, {n['failed']} failed, {n['errors']} errors, " \
                   f"{n['skipped']} skipped"
        if r.name == "loss_bench" and n:
            bits = []
            for impl, v in n["impls"].items():
                if "ms" in v:
                    frac = v["fraction_of_copy_bandwidth"]
                    bits.append(f"{impl} {v['ms']:.1f} ms ({v['speedup_vs_eager']:.2f}x eager, "
                                f"{v['peak_extra_mib']:.0f} MiB"
                                + (f", {frac:.0%} of copy BW" if frac is not None else "") + ")")
            return "; ".join(bits) + (f"; copy {n['copy_gb_per_s']:.0f} GB/s"
                                      if n.get("copy_gb_per_s") else "")
        if r.name == "data_bench" and n:
            return "; ".join(f"{k}: " + ", ".join(f"{p} {v:.0f}" for p, v in rates.items()
                                                  if not p.endswith("_vs_torch")) + " img/s"
                             for k, rates in n["inputs"].items())
        if r.name == "run" and n.get("steps"):
            steps = "; ".join(f"step {s['step']}: {s['iterations']} it in {s['seconds']:.0f} s, "
                              f"loss {s['loss_first']:.3g} -> {s['loss_last']:.3g}"
                              for s in n["steps"] if s.get("loss_first") is not None)
            return steps + (f"; final mIoU {n['final_miou_all']:.3f}"
                            if isinstance(n.get("final_miou_all"), float) else "")
    except (KeyError, TypeError, ValueError):
        pass
    return ""


def format_table(results: list[PartResult]) -> str:
    lines = [f"{'part':<11} {'status':<11} {'seconds':>8}  numbers", "-" * 78]
    for r in results:
        text = summary(r)
        if r.reason:
            text = f"{r.reason}" + (f" | {text}" if text else "")
        lines.append(f"{r.name:<11} {r.status:<11} {r.seconds:>8.1f}  {text}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/gpu_check.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    p.add_argument("--quick", action="store_true",
                   help="smaller benchmark sizes and run budget, shorter time limits")
    p.add_argument("--out", help="the JSON to write (default "
                   "tools/results/gpu_check/<device-name>.json)")
    p.add_argument("--workdir", help="folder for the parts' outputs, synthetic data and run "
                   "(default: a temporary folder, deleted at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--timeout", type=float, help="seconds per part, instead of each part's own")
    p.add_argument("--dry-run", action="store_true",
                   help="print each part's command and exit (needs no GPU)")
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in args.parts if s not in PARTS]
    if unknown or not args.parts:
        p.error(f"unknown part(s) {', '.join(unknown) or '(none given)'}; "
                f"known: {', '.join(PARTS)}")
    return args


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None, runner: Callable[[Part], Outcome] = run_command,
         has_cuda: Callable[[], bool] = cuda_available,
         describe: Callable[[], tuple[dict, dict]] | None = None) -> int:
    """Run the selected parts and write the report; `runner`, `has_cuda` and `describe`
    (device info and versions) are replaceable for tests."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.dry_run:
        workdir = Path(args.workdir or Path(tempfile.gettempdir()) / "gpu_check")
        parts = build_parts(workdir, args.quick, timeout=args.timeout)
        print(f"gpu_check dry run: {len(args.parts)} part(s), run from {ROOT}, outputs under "
              f"{workdir}; would write {args.out or RESULTS / '<device-name>.json'}")
        for name in args.parts:
            part = parts[name]
            env = "".join(f"{k}={v} " for k, v in part.env.items())
            print(f"\n[{name}] {part.what} (time limit {part.timeout:.0f} s; needs "
                  f"{', '.join(part.needs)})\n  {env}{shlex.join(part.command)}")
        return 0
    if not has_cuda():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on "
              "a GPU machine, or with --dry-run to list the commands", file=sys.stderr)
        return 2

    device, vers = describe() if describe else (device_info(), versions())
    out = Path(args.out) if args.out else RESULTS / f"{slug(device['name'])}.json"
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    parts = build_parts(workdir.resolve(), args.quick, timeout=args.timeout)
    print(f"gpu_check on {device['name']} (driver {device.get('driver')}, CUDA "
          f"{vers.get('torch_cuda')}, torch {vers.get('torch')}); work folder {workdir}",
          flush=True)
    results = []
    try:
        for name in args.parts:
            part = parts[name]
            missing = missing_modules(part)
            if missing:
                r = PartResult(name, "unavailable", None, 0.0, part.command, "", {},
                               f"cannot import {', '.join(missing)}")
            else:
                print(f"[{name}] {shlex.join(part.command)}", flush=True)
                r = judge(part, runner(part))
            results.append(r)
            print(f"[{name}] {r.status} in {r.seconds:.0f} s" +
                  (f": {r.reason}" if r.reason else ""), flush=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    previous = None
    if out.is_file():
        try:
            previous = json.loads(out.read_text())
        except ValueError:
            previous = None
    report = assemble_report(device, vers, results, argv, previous, git_commit())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(format_table(results))
    kept = [p for p in report["parts"] if p not in args.parts]
    print(f"\nwrote {out}" + (f" (kept from the earlier report: {', '.join(kept)})"
                                if kept else ""))
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())

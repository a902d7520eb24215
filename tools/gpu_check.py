"""One command for a GPU machine: the checks that need CUDA, written to one JSON. Sized for a
short device slot: the default plan's time limits add up to 8 minutes (480 s), so it fits a
15-minute loan, start included, with room to run it once more; `--parts` runs the rest.

Each part is a subprocess (or two) with its own time limit; one failing does not stop the
others. The default plan, in order (limits in seconds):
  cuda_tests     120  the tests marked `cuda` except the compiled-path ones (pytest -m cuda
                      -k "not compiled"): the Triton kernels against float64, every dtype and
                      layout, the path the run takes; counted from its JUnit XML
  run            285  python -m icd_dist.run on a VOC-shaped config (configs/voc/15-1_icd.yaml:
                      DeepLabV3-ResNet-101, 21 classes, crop 512, 15-1 stopped after its first
                      incremental step) on synthetic data: DeepSpeed in bf16 (the teacher at
                      its configured default), DALI on the GPU, 1 worker, micro-batch 2 x
                      accumulation 2, 12 + 4 iterations. Each step's metrics.json must show
                      the configured precision's dtype in every observed feature tap and
                      logit (`observed_dtypes`), else the part fails
  loss_quick      75  tools/bench_loss.py at the real tap sizes (batch 12, crop 512, bf16),
                      Triton vs eager only (no inductor compile), against a device-to-device
                      copy's bandwidth
The other parts, run with `--parts` (their limits count only when selected; `--quick` runs
them smaller, with the second limit):
  cuda_compiled  300  the rest of the `cuda` tests: the compiled (inductor) path, a recompile
                      per dtype/layout
  loss_bench     600 / 300  bench_loss.py in full: Triton vs compiled vs eager, peak memory
  data_bench     600 / 300  tools/bench_data.py --dali-device gpu: DALI on the GPU vs the torch
                      pipeline and a plain DataLoader, batches timed onto the GPU
  channels_last  600 / 420  the run twice, engine.channels_last=false then =true (40 + 8
                      iterations; 12 + 4 with --quick): images/s of each step and of both
                      steps together (global batch x iterations / training seconds, which
                      include the first iterations' warm-up), and true over false

    python tools/gpu_check.py                       # the default plan, under 8 minutes
    python tools/gpu_check.py --parts loss_bench    # more, in another command
    python tools/gpu_check.py --parts all --dry-run # every part, its command and limit

It prints a table (part, status, seconds, key numbers) and writes one JSON (default
tools/results/gpu_check/<device-name>.json), again after each part so that a slot cut short
keeps what finished: device, CUDA and driver, the versions of torch, Triton, DeepSpeed, Ray
and DALI, and per part its command, status, return code, seconds, the tail of its output and
the numbers read from its outputs. When that file already holds a report from the same
device, the parts not run this time are kept (so the parts can run in separate commands).
Exit status 0 when every part run is ok, 1 otherwise, 2 without CUDA. `--dry-run` lists the
plan (each part's command and limit, the total and whether it fits 480 s) and needs no GPU.

    python tools/gpu_check.py [--parts default|all|NAME,...] [--quick] [--out FILE]
                              [--workdir DIR] [--keep] [--timeout S] [--dry-run]
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
# Every part, in the order they run; the default plan is the first three.
PARTS = ("cuda_tests", "run", "loss_quick", "cuda_compiled", "loss_bench", "data_bench",
         "channels_last")
DEFAULT_PLAN = ("cuda_tests", "run", "loss_quick")
SLOT_SECONDS = 480  # the default plan's limits must add up to no more (twice fits 15 minutes)
# Seconds per part: (as selected, with --quick). The default plan's parts have one size; a
# first call compiles Triton/inductor kernels, and the run starts Ray and DeepSpeed per step.
TIMEOUTS = {"cuda_tests": (120, 120), "run": (285, 285), "loss_quick": (75, 75),
            "cuda_compiled": (300, 300), "loss_bench": (600, 300), "data_bench": (600, 300),
            "channels_last": (600, 420)}
RUN_CONFIG = "configs/voc/15-1_icd.yaml"
TAIL_CHARS = 4000
RUN_BATCH = 4  # the run's global batch (optim.batch_size): micro-batch 2 x accumulation 2
RUN_PRECISION = "bf16"
# (step 0, later steps) iterations: the run part, and channels_last in full
RUN_ITERATIONS = (12, 4)
CHANNELS_LAST_ITERATIONS = (40, 8)
# The tensor dtype (str(tensor.dtype) without "torch.") each configured precision gives the
# student's feature taps and logits, and the teacher's logits under the student's autocast.
PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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
    then: list[list[str]] = field(default_factory=list)  # run after `command`, same limit
    precision: str | None = None  # the precision its runs are configured with

    @property
    def commands(self) -> list[list[str]]:
        return [self.command, *self.then]

    def command_text(self) -> str:
        """Its command line(s) as shell text, `; ` between two."""
        return "; ".join(shlex.join(c) for c in self.commands)


@dataclass
class Outcome:
    """What running a part's command(s) gave."""

    returncode: int | None  # None: killed at its time limit; else the first non-zero, or 0
    seconds: float
    output: str  # stdout and stderr, interleaved


@dataclass
class PartResult:
    name: str
    status: str  # ok | failed | timeout | unavailable
    returncode: int | None
    seconds: float
    command: str  # shell text
    output_tail: str
    numbers: dict
    reason: str | None = None

    def to_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "returncode": self.returncode,
                "seconds": round(self.seconds, 2), "command": self.command,
                "numbers": self.numbers, "output_tail": self.output_tail}


# --------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------


def run_overrides(workdir: Path, name: str = "gpu_check",
                  iterations: tuple[int, int] = RUN_ITERATIONS) -> list[str]:
    """The key=value overrides that turn configs/voc/15-1_icd.yaml into the GPU check's run
    under `workdir` (runs/, data/): synthetic VOC-shaped data (21 classes, 500x375 images),
    no pretrained weights, bf16 (the teacher's dtype is the config's default), DALI on the
    GPU, 1 worker, micro-batch 2 x accumulation 2, `iterations` (step 0, later steps)."""
    return [
        f"run.name={name}",
        f"run.storage_path={workdir / 'runs'}",
        "data.dataset=synthetic",
        f"data.train_shards={workdir / 'data' / 'train'}",
        f"data.eval_shards={workdir / 'data' / 'val'}",
        "data.synthetic.classes=21",
        "data.synthetic.num_train=96",
        "data.synthetic.num_eval=16",
        "data.synthetic.height=375",
        "data.synthetic.width=500",
        "data.crop_size=512",
        "data.eval_size=512",
        "data.pipeline=dali",
        "model.pretrained=none",
        "engine.device=cuda",
        "engine.num_workers=1",
        f"engine.precision={RUN_PRECISION}",
        f"optim.batch_size={RUN_BATCH}",
        "engine.micro_batch_size=2",
        f"optim.iterations={iterations[0]}",
        f"optim.iterations_incremental={iterations[1]}",
        "eval.batch_size=4",
        "logging.wandb=disabled",
    ]


def build_parts(workdir: Path, quick: bool = False, python: str = sys.executable,
                timeout: float | None = None) -> dict[str, Part]:
    """Every part's command, in order; outputs go under `workdir`."""

    def limit(name: str) -> float:
        return timeout if timeout else TIMEOUTS[name][1 if quick else 0]

    def pytest(selection: str, xml: Path) -> list[str]:
        return [python, "-m", "pytest", "-q", "-m", "cuda", "-k", selection, "-p",
                "no:cacheprovider", "--continue-on-collection-errors", "-rfEs",
                f"--junitxml={xml}", "tests"]

    def run(folder: Path, name: str, iterations: tuple[int, int], *extra: str) -> list[str]:
        return [python, "-m", "icd_dist.run", "--config", RUN_CONFIG, "--last-step", "1",
                *run_overrides(folder, name, iterations), *extra]

    tests_xml, compiled_xml = workdir / "cuda_tests.xml", workdir / "cuda_compiled.xml"
    quick_json, loss_json = workdir / "bench_loss_quick.json", workdir / "bench_loss.json"
    data_json = workdir / "bench_data.json"
    loss_size = ["--batch", "4", "--repeats", "3"] if quick else []
    data_size = ["--images", "128", "--rounds", "2"] if quick else ["--images", "512",
                                                                    "--rounds", "3"]
    cl_dir = workdir / "channels_last"
    cl_iterations = RUN_ITERATIONS if quick else CHANNELS_LAST_ITERATIONS
    run_needs = ("torch", "ray", "deepspeed", "nvidia.dali")
    parts = [
        Part("cuda_tests", pytest("not compiled", tests_xml), limit("cuda_tests"),
             ("pytest", "torch"), {"junit": tests_xml},
             what="the cuda tests but the compiled path's: Triton kernels vs float64"),
        Part("run", run(workdir, "gpu_check", RUN_ITERATIONS), limit("run"), run_needs,
             {"runs": workdir / "runs"}, env={"WANDB_MODE": "disabled"},
             what=f"2 steps of VOC 15-1 (ICD), synthetic data, {RUN_PRECISION}, DALI, "
                  f"1 worker, {RUN_ITERATIONS[0]} + {RUN_ITERATIONS[1]} iterations; "
                  "observed dtypes checked",
             precision=RUN_PRECISION),
        Part("loss_quick",
             [python, "tools/bench_loss.py", "--device", "cuda", "--impls", "eager,triton",
              "--repeats", "3", "--out", str(quick_json)],
             limit("loss_quick"), ("torch", "triton", "psutil"), {"json": quick_json},
             what="ICD losses at batch 12: Triton vs eager vs a device-to-device copy"),
        Part("cuda_compiled", pytest("compiled", compiled_xml), limit("cuda_compiled"),
             ("pytest", "torch"), {"junit": compiled_xml},
             what="the compiled path's cuda tests (an inductor compile each)"),
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
        Part("channels_last",
             run(cl_dir, "gpu_check_cl_false", cl_iterations, "engine.channels_last=false"),
             limit("channels_last"), run_needs,
             {"false": cl_dir / "runs" / "gpu_check_cl_false",
              "true": cl_dir / "runs" / "gpu_check_cl_true"},
             env={"WANDB_MODE": "disabled"},
             what=f"the run twice ({cl_iterations[0]} + {cl_iterations[1]} iterations), "
                  "engine.channels_last=false then true: images/s of each",
             then=[run(cl_dir, "gpu_check_cl_true", cl_iterations,
                       "engine.channels_last=true")],
             precision=RUN_PRECISION),
    ]
    return {p.name: p for p in parts}


def plan_seconds(parts: dict[str, Part], names: list[str] | tuple[str, ...]) -> float:
    """The sum of the named parts' time limits."""
    return sum(parts[n].timeout for n in names)


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


def dtype_problem(m: dict, configured: str | None) -> str | None:
    """Whether a step's metrics.json shows its precision in the tensors: every observed
    student tap and logit (and the teacher's logits, under the student's autocast) in the
    dtype of the resolved `precision`, that precision the one the run was configured with
    (`configured`, None: any), and the teacher's logits recorded after step 0 (the run's
    method, ICD, has a teacher there). None when it does; else the problem, in one line."""
    step, precision = m.get("step"), m.get("precision")
    want = PRECISION_DTYPE.get(precision)
    if want is None:
        return f"step {step}: precision {precision!r} is none of {', '.join(PRECISION_DTYPE)}"
    if configured and precision != configured:
        return f"step {step}: precision {precision}, the run was configured with {configured}"
    seen = m.get("observed_dtypes")
    if not isinstance(seen, dict):
        return f"step {step}: metrics.json has no observed_dtypes (a run that does not " \
               f"record them cannot show its {precision} dtypes)"
    taps = seen.get("taps")
    if not isinstance(taps, list) or not taps:
        return f"step {step}: observed_dtypes has no feature taps"
    wrong = [f"tap {i} {d}" for i, d in enumerate(taps) if d != want]
    wrong += [f"{k} {seen.get(k)}" for k in ("logits", "teacher_logits")
              if seen.get(k) != want and not (k == "teacher_logits" and seen.get(k) is None)]
    if wrong:
        return f"step {step}: observed {', '.join(wrong)}; expected {want} (precision " \
               f"{precision})"
    if seen.get("teacher_logits") is None and isinstance(step, int) and step > 0:
        return f"step {step}: observed_dtypes has no teacher_logits after step 0"
    return None


def read_steps(files: list[Path], precision: str | None) -> tuple[list[dict], list[str]]:
    """Each step's numbers from its metrics.json: seconds, iterations, images/s, first and
    last loss, mIoU, the precision and the observed dtypes; the problems found (a loss not
    finite, a dtype not the precision's: see dtype_problem)."""
    steps, problems = [], []
    for f in files:
        m = json.loads(f.read_text())
        curve = m.get("loss_curve") or []
        step = {"step": m.get("step"), "seconds": round(m.get("seconds", 0.0), 2),
                "iterations": m.get("iterations"), "train_images": m.get("train_images"),
                "loss_first": curve[0] if curve else None,
                "loss_last": curve[-1] if curve else None,
                "miou_all": m.get("miou_all"), "engine": m.get("engine"),
                "precision": m.get("precision"), "teacher_weights": m.get("teacher_dtype"),
                "observed_dtypes": m.get("observed_dtypes")}
        if m.get("seconds") and m.get("iterations"):
            step["images_per_s"] = round(RUN_BATCH * m["iterations"] / m["seconds"], 2)
        if not curve or not _finite(*curve):
            problems.append(f"step {m.get('step')}: loss curve empty or not finite")
        problem = dtype_problem(m, precision)
        if problem:
            problems.append(problem)
        steps.append(step)
    return steps, problems


def final_line(output: str) -> dict:
    """The run's last line that is a JSON object with "run" (its final mIoU and hIoU)."""
    for line in reversed(output.splitlines()):
        try:
            final = json.loads(line)
        except ValueError:
            continue
        if isinstance(final, dict) and "run" in final:
            return final
    return {}


def parse_run(part: Part, output: str) -> tuple[dict, str | None]:
    """The run's final line and each step's metrics.json (read_steps); a problem when a step
    is missing, a loss is not finite or an observed dtype is not the precision's."""
    numbers: dict = {"steps": []}
    final = final_line(output)
    numbers.update({k: final[k] for k in ("final_miou_all", "final_hiou") if k in final})
    runs = part.outputs["runs"]
    files = sorted(runs.glob("*/step_*/metrics.json")) if runs.is_dir() else []
    numbers["steps"], problems = read_steps(files, part.precision)
    if len(files) < 2:
        problems.append(f"{len(files)} of 2 steps finished")
    return numbers, "; ".join(problems) or None


def parse_channels_last(part: Part, output: str) -> tuple[dict, str | None]:
    """Per setting of engine.channels_last (its run folder: the config it ran with, each
    step as read_steps reads it): images/s of both steps together (global batch x
    iterations / seconds); and true over false. The same problems as the run's, per
    setting, and a run whose config.yaml does not hold the setting asked for."""
    import yaml

    numbers: dict = {}
    problems = []
    for setting in ("false", "true"):
        folder = part.outputs[setting]
        files = sorted(folder.glob("step_*/metrics.json")) if folder.is_dir() else []
        steps, found = read_steps(files, part.precision)
        config = folder / "config.yaml"
        if config.is_file():
            ran = (yaml.safe_load(config.read_text()).get("engine") or {}).get("channels_last")
            if ran is not (setting == "true"):
                found.append(f"its config.yaml has engine.channels_last {ran}")
        if len(files) < 2:
            found.append(f"{len(files)} of 2 steps finished")
        seconds = sum(s["seconds"] for s in steps)
        iterations = sum(s["iterations"] or 0 for s in steps)
        numbers[setting] = {"steps": steps, "images_per_s":
                            round(RUN_BATCH * iterations / seconds, 2) if seconds else None}
        problems += [f"channels_last={setting}: {p}" for p in found]
    rates = [numbers[s]["images_per_s"] for s in ("false", "true")]
    numbers["true_vs_false"] = round(rates[1] / rates[0], 3) if all(rates) else None
    return numbers, "; ".join(problems) or None


PARSERS: dict[str, Callable[[Part, str], tuple[dict, str | None]]] = {
    "cuda_tests": parse_cuda_tests, "cuda_compiled": parse_cuda_tests,
    "loss_quick": parse_loss_bench, "loss_bench": parse_loss_bench,
    "data_bench": parse_data_bench, "run": parse_run, "channels_last": parse_channels_last}


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
    return PartResult(part.name, status, outcome.returncode, outcome.seconds,
                      part.command_text(), tail, numbers, reason)


def run_command(part: Part) -> Outcome:
    """Run the part's command(s) one after the other from the repository root, output to a
    file, each in its own process group, which is killed (SIGKILL) when the part's time limit
    (for all of them together) runs out; a later command runs even when one failed."""
    env = {**os.environ, **part.env, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                      os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryFile("w+", errors="replace") as log:
        start = time.perf_counter()
        rc: int | None = 0
        for command in part.commands:
            if len(part.commands) > 1:
                log.write(f"$ {shlex.join(command)}\n")
                log.flush()
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=max(0.0, part.timeout - (time.perf_counter() - start)))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
                break
            rc = rc or code
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
    the same device) that were not run this time. `ok`: every part there and ok;
    `default_plan_ok`: the default plan's parts there and ok."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    parts: dict[str, dict] = {}
    if previous and previous.get("device", {}).get("name") == device.get("name"):
        parts.update(previous.get("parts", {}))
    for r in results:
        parts[r.name] = {**r.to_dict(), "finished": now}
    ordered = {name: parts[name] for name in PARTS if name in parts}

    def all_ok(names) -> bool:
        return all(ordered.get(n, {}).get("status") == "ok" for n in names)

    return {"tool": "tools/gpu_check.py", "created": now,
            "command": shlex.join(["python", "tools/gpu_check.py", *argv]),
            "device": device, "versions": vers, "git": git,
            "ok": all_ok(PARTS), "default_plan_ok": all_ok(DEFAULT_PLAN), "parts": ordered}


def exit_code(results: list[PartResult]) -> int:
    """0 when every part run is ok, else 1."""
    return 0 if results and all(r.status == "ok" for r in results) else 1


def _run_summary(steps: list[dict]) -> str:
    bits = []
    for s in steps:
        if s.get("loss_first") is None:
            continue
        text = f"step {s['step']}: {s['iterations']} it in {s['seconds']:.0f} s, " \
               f"loss {s['loss_first']:.3g} -> {s['loss_last']:.3g}"
        seen = s.get("observed_dtypes") or {}
        names = {*(seen.get("taps") or []), seen.get("logits"), seen.get("teacher_logits")}
        names.discard(None)
        if names:
            text += f", {s.get('precision')}: {'/'.join(sorted(names))}"
        bits.append(text)
    return "; ".join(bits)


def summary(r: PartResult) -> str:
    """The key numbers of a part in one line."""
    n = r.numbers
    try:
        if r.name in ("cuda_tests", "cuda_compiled") and n:
            return f"{n['passed']} passed, {n['failed']} failed, {n['errors']} errors, " \
                   f"{n['skipped']} skipped"
        if r.name in ("loss_quick", "loss_bench") and n:
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
            return _run_summary(n["steps"]) + (f"; final mIoU {n['final_miou_all']:.3f}"
                                               if isinstance(n.get("final_miou_all"), float)
                                               else "")
        if r.name == "channels_last" and n:
            rate = {s: n[s]["images_per_s"] for s in ("false", "true")}
            return ", ".join(f"{s} {v:.1f} img/s" if v else f"{s} -" for s, v in rate.items()) \
                + (f"; true/false {n['true_vs_false']:.3f}" if n.get("true_vs_false") else "")
    except (KeyError, TypeError, ValueError):
        pass
    return ""


def format_table(results: list[PartResult]) -> str:
    lines = [f"{'part':<13} {'status':<11} {'seconds':>8}  numbers", "-" * 80]
    for r in results:
        text = summary(r)
        if r.reason:
            text = f"{r.reason}" + (f" | {text}" if text else "")
        lines.append(f"{r.name:<13} {r.status:<11} {r.seconds:>8.1f}  {text}")
    return "\n".join(lines)


def plan_text(parts: dict[str, Part], names: list[str], default: bool) -> str:
    """The dry run's listing: each part with its limit and command(s), the total of the
    limits against SLOT_SECONDS, and the parts left out."""
    lines = []
    for name in names:
        part = parts[name]
        env = "".join(f"{k}={v} " for k, v in part.env.items())
        lines.append(f"\n[{name}] {part.what} (time limit {part.timeout:.0f} s; needs "
                     f"{', '.join(part.needs)})")
        lines += [f"  {env}{shlex.join(c)}" for c in part.commands]
    total = plan_seconds(parts, names)
    fits = "within" if total <= SLOT_SECONDS else f"over, by {total - SLOT_SECONDS:.0f} s,"
    lines.append(f"\n{'default plan' if default else 'selected parts'}: "
                 + " + ".join(f"{n} {parts[n].timeout:.0f}" for n in names)
                 + f" = {total:.0f} s of time limits, {fits} the {SLOT_SECONDS} s of a short "
                 "device slot")
    rest = [n for n in PARTS if n not in names]
    if rest:
        lines.append("not in it: " + ", ".join(f"{n} ({parts[n].timeout:.0f} s)" for n in rest)
                     + "; run them with --parts NAME[,NAME...]")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python tools/gpu_check.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="default",
                   help=f"comma-separated parts to run, or `default` (the plan that fits "
                        f"{SLOT_SECONDS} s: {','.join(DEFAULT_PLAN)}) or `all`; known: "
                        f"{','.join(PARTS)}")
    p.add_argument("--quick", action="store_true",
                   help="the parts outside the default plan at smaller sizes and shorter time "
                        "limits (the default plan's parts have one size)")
    p.add_argument("--out", help="the JSON to write (default "
                   "tools/results/gpu_check/<device-name>.json)")
    p.add_argument("--workdir", help="folder for the parts' outputs, synthetic data and run "
                   "(default: a temporary folder, deleted at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--timeout", type=float, help="seconds per part, instead of each part's own")
    p.add_argument("--dry-run", action="store_true",
                   help="list the parts to run: command, time limit, the total of the limits "
                        f"and whether it fits {SLOT_SECONDS} s (needs no GPU)")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.parts.split(",") if s.strip()]
    args.default_plan = names == ["default"]
    names = [n for s in names for n in {"default": DEFAULT_PLAN, "all": PARTS}.get(s, (s,))]
    unknown = [s for s in names if s not in PARTS]
    if unknown or not names:
        p.error(f"unknown part(s) {', '.join(unknown) or '(none given)'}; "
                f"known: {', '.join(PARTS)} (or default, all)")
    args.parts = list(dict.fromkeys(names))
    return args


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None, runner: Callable[[Part], Outcome] = run_command,
         has_cuda: Callable[[], bool] = cuda_available,
         describe: Callable[[], tuple[dict, dict]] | None = None) -> int:
    """Run the selected parts and write the report (after each part); `runner`, `has_cuda`
    and `describe` (device info and versions) are replaceable for tests."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.dry_run:
        workdir = Path(args.workdir or Path(tempfile.gettempdir()) / "gpu_check")
        parts = build_parts(workdir, args.quick, timeout=args.timeout)
        print(f"gpu_check dry run: {len(args.parts)} part(s), run from {ROOT}, outputs under "
              f"{workdir}; would write {args.out or RESULTS / '<device-name>.json'}")
        print(plan_text(parts, args.parts, args.default_plan))
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
          f"{vers.get('torch_cuda')}, torch {vers.get('torch')}); work folder {workdir}; "
          f"{', '.join(args.parts)}: {plan_seconds(parts, args.parts):.0f} s of time limits",
          flush=True)
    previous = None
    if out.is_file():
        try:
            previous = json.loads(out.read_text())
        except ValueError:
            previous = None
    git = git_commit()
    results: list[PartResult] = []

    def write_report() -> dict:
        report = assemble_report(device, vers, results, argv, previous, git)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        return report

    try:
        for name in args.parts:
            part = parts[name]
            missing = missing_modules(part)
            if missing:
                r = PartResult(name, "unavailable", None, 0.0, part.command_text(), "", {},
                               f"cannot import {', '.join(missing)}")
            else:
                print(f"[{name}] {part.command_text()}", flush=True)
                r = judge(part, runner(part))
            results.append(r)
            print(f"[{name}] {r.status} in {r.seconds:.0f} s" +
                  (f": {r.reason}" if r.reason else ""), flush=True)
            write_report()  # a slot cut short keeps the parts that finished
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report = write_report()
    print()
    print(format_table(results))
    kept = [p for p in report["parts"] if p not in args.parts]
    print(f"\nwrote {out}" + (f" (kept from the earlier report: {', '.join(kept)})"
                                if kept else ""))
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())

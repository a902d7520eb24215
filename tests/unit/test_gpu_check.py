"""tools/gpu_check.py on a CPU: the no-CUDA exit, the commands of its four parts (valid options
and config keys), reading each part's outputs, the report JSON and the exit status."""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from icd_dist.config import load_config, micro_batch_and_accumulation
from icd_dist.css import task_from_config

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "gpu_check.py"
NO_CUDA = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU even where the tests run on one


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def tool(*args, env=NO_CUDA, timeout=120):
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


# --------------------------------------------------------------------------------------
# Without CUDA, and the dry run
# --------------------------------------------------------------------------------------


def test_without_cuda_one_line_and_exit_status_2(tmp_path):
    out = tmp_path / "report.json"
    proc = tool("--out", str(out), "--workdir", str(tmp_path / "work"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--dry-run" in lines[0]
    assert proc.stdout == ""
    assert not out.exists() and not (tmp_path / "work").exists()


def test_without_cuda_nothing_runs(gc, tmp_path):
    def runner(part):
        raise AssertionError(f"{part.name} ran without CUDA")

    assert gc.main(["--out", str(tmp_path / "r.json")], runner=runner,
                   has_cuda=lambda: False) == 2
    assert not (tmp_path / "r.json").exists()


def dry_run_commands(workdir: Path, *args: str) -> dict[str, list[str]]:
    """{part: argv} as the dry run prints them (where no CUDA is visible)."""
    proc = tool("--dry-run", "--workdir", str(workdir), *args)
    assert proc.returncode == 0, proc.stderr
    commands, name = {}, None
    for line in proc.stdout.splitlines():
        m = re.match(r"\[(\w+)\] ", line)
        if m:
            name = m.group(1)
        elif line.startswith("  ") and name:
            argv = shlex.split(line)
            while "=" in argv[0] and not argv[0].startswith("/"):  # VAR=value prefixes
                argv.pop(0)
            commands[name] = argv
    return commands


def test_dry_run_lists_the_four_parts_and_their_commands(gc, tmp_path):
    work = tmp_path / "work"
    commands = dry_run_commands(work)
    assert list(commands) == ["cuda_tests", "loss_bench", "data_bench", "run"]
    assert not work.exists()  # a dry run creates nothing

    tests = commands["cuda_tests"]
    assert tests[1:3] == ["-m", "pytest"]
    i = tests.index("cuda")
    assert tests[i - 1] == "-m" and tests[-1] == "tests"
    assert f"--junitxml={work / 'cuda_tests.xml'}" in tests

    loss = commands["loss_bench"]
    assert loss[1] == "tools/bench_loss.py"
    assert loss[loss.index("--device") + 1] == "cuda"
    assert loss[loss.index("--out") + 1] == str(work / "bench_loss.json")

    data = commands["data_bench"]
    assert data[1] == "tools/bench_data.py"
    assert data[data.index("--dali-device") + 1] == "gpu"
    assert data[data.index("--out") + 1] == str(work / "bench_data.json")

    run = commands["run"]
    assert run[1:5] == ["-m", "icd_dist.run", "--config", "configs/voc/15-1_icd.yaml"]
    assert run[run.index("--last-step") + 1] == "1"
    for override in ("engine.precision=bf16", "engine.teacher_dtype=bf16", "data.pipeline=dali",
                     "engine.num_workers=1", "engine.device=cuda", "model.pretrained=none",
                     "data.dataset=synthetic", "data.synthetic.classes=21",
                     "data.crop_size=512"):
        assert override in run, override
    assert f"run.storage_path={work / 'runs'}" in run


def test_dry_run_of_selected_parts_quick(tmp_path):
    commands = dry_run_commands(tmp_path, "--parts", "loss_bench,run", "--quick")
    assert list(commands) == ["loss_bench", "run"]
    assert "--batch" in commands["loss_bench"]
    assert "optim.iterations=4" in commands["run"]
    proc = tool("--dry-run", "--parts", "loss_bench,nope")
    assert proc.returncode == 2 and "unknown part(s) nope" in proc.stderr


def test_run_overrides_are_valid_keys_of_a_voc_shaped_bf16_dali_run(tmp_path):
    run = dry_run_commands(tmp_path)["run"]
    config = run[run.index("--config") + 1]
    overrides = [a for a in run if "=" in a and not a.startswith("-")]
    cfg = load_config(ROOT / config, overrides)  # a wrong key or value raises ConfigError
    task = task_from_config(cfg)
    assert task.steps[0] == tuple(range(16)) and task.steps[1] == (16,)  # 15-1, 21 classes
    assert cfg.model.backbone == "resnet101" and cfg.model.pretrained == "none"
    assert cfg.method.name == "icd" and cfg.data.crop_size == 512
    assert (cfg.engine.precision, cfg.engine.teacher_dtype) == ("bf16", "bf16")
    assert (cfg.data.pipeline, cfg.engine.device, cfg.engine.num_workers) == ("dali", "cuda", 1)
    assert cfg.engine.engine == "deepspeed"
    assert micro_batch_and_accumulation(cfg) == (2, 2)  # gradient accumulation is exercised
    assert cfg.optim.iterations and cfg.optim.iterations_incremental
    assert cfg.data.train_shards == str(tmp_path / "data" / "train")


def _help(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=NO_CUDA)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("part", ["loss_bench", "data_bench", "run"])
def test_the_commands_options_exist(tmp_path, part):
    """Every --option of a part's command is one its script takes, with an allowed value."""
    argv = dry_run_commands(tmp_path)[part]
    program = argv[:3] if argv[1] == "-m" else argv[:2]
    text = " ".join(_help([sys.executable, *program[1:], "--help"]).split())
    options = [(a, argv[i + 1] if i + 1 < len(argv) else None)
               for i, a in enumerate(argv) if a.startswith("--")]
    assert options
    for option, value in options:
        assert re.search(rf"{re.escape(option)}\b", text), f"{program[-1]} has no {option}"
        choices = re.search(rf"{re.escape(option)} \{{([^}}]*)\}}", text)
        if choices:
            assert value in choices.group(1).split(","), (option, value, choices.group(0))


def test_the_cuda_selection_collects_tests(tmp_path):
    argv = dry_run_commands(tmp_path)["cuda_tests"]
    argv = [a for a in argv if not a.startswith("--junitxml")] + ["--collect-only"]
    proc = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env=NO_CUDA)
    assert proc.returncode == 0, proc.stdout[-3000:]
    m = re.search(r"(\d+)/(\d+) tests? collected", proc.stdout)
    assert m and int(m.group(1)) > 0, proc.stdout[-1000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert ids and all("cuda" in i for i in ids)


# --------------------------------------------------------------------------------------
# Reading the parts' outputs
# --------------------------------------------------------------------------------------


def test_junit_counts_from_a_real_pytest_run(gc, tmp_path):
    """The part's own pytest options over a made-up suite: a test module that cannot be
    imported counts as an error without stopping the others."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs CUDA\n")
    (suite / "test_a.py").write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.cuda\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2\n"
        "@pytest.mark.skip(reason='not here')\n"
        "def test_skip(): pass\n")
    (suite / "test_b.py").write_text("import no_such_module_for_gpu_check\n")
    (suite / "test_c.py").write_text("def test_not_cuda(): pass\n")
    part = gc.build_parts(tmp_path)["cuda_tests"]

    def run_suite():
        argv = [suite if a == "tests" else a for a in part.command]
        subprocess.run(argv, capture_output=True, cwd=suite, timeout=120, env=NO_CUDA)
        return gc.parse_cuda_tests(part, "")

    numbers, problem = run_suite()
    assert (numbers["passed"], numbers["failed"], numbers["errors"], numbers["skipped"]) == \
        (1, 1, 1, 1)
    assert problem and "1 failed, 1 errors" in problem
    assert any("test_bad" in t for t in numbers["failed_tests"])

    (suite / "test_a.py").write_text("import pytest\n@pytest.mark.cuda\ndef test_ok(): pass\n")
    numbers, problem = run_suite()  # the module that does not import, alone, fails the part
    assert (numbers["passed"], numbers["errors"]) == (1, 1) and problem.startswith("0 failed")
    (suite / "test_b.py").unlink()
    assert run_suite() == ({"passed": 1, "failed": 0, "errors": 0, "skipped": 0,
                            "failed_tests": [], "skipped_tests": []}, None)
    (suite / "test_a.py").write_text("import pytest\n@pytest.mark.cuda\n@pytest.mark.skip\n"
                                     "def test_s(): pass\n")
    assert run_suite()[1] == "no cuda test ran"


MIB = 2**20


def loss_json(triton_skipped=False, nan=False):
    rows = [{"impl": "eager", "seconds": 0.010, "warmup_seconds": 0.5,
             "peak_extra_bytes": 1000 * MIB, "loss_int": 0.0277, "loss_ext": 0.0018,
             "bandwidth_fraction_of_copy": 0.1, "speedup_vs_eager": 1.0,
             "memory_vs_eager": 1.0},
            {"impl": "compiled", "seconds": 0.004, "warmup_seconds": 30.0,
             "peak_extra_bytes": 600 * MIB, "loss_int": 0.0277, "loss_ext": 0.0018,
             "bandwidth_fraction_of_copy": 0.25, "speedup_vs_eager": 2.5,
             "memory_vs_eager": 0.6}]
    if triton_skipped:
        rows.append({"impl": "triton", "skipped": "needs CUDA and Triton"})
    else:
        rows.append({"impl": "triton", "seconds": 0.002, "warmup_seconds": 5.0,
                     "peak_extra_bytes": 450 * MIB,
                     "loss_int": float("nan") if nan else 0.0277, "loss_ext": 0.0018,
                     "bandwidth_fraction_of_copy": 0.5, "speedup_vs_eager": 5.0,
                     "memory_vs_eager": 0.45})
    return {"device": "GPU: NVIDIA H100 80GB HBM3", "versions": {"torch": "2.x"},
            "dtype": "torch.bfloat16", "batch": 12, "crop": 512, "tap_bytes": 222 * MIB,
            "copy_bandwidth_bytes_per_s": 3.0e12, "results": rows}


DATA_JSON = {"env": {"device": "GPU: NVIDIA H100 80GB HBM3; CPU: x, 16 cores",
                     "dali_device": "gpu", "workers": 16, "batch": 8},
             "results": [{"input": "camvid-sized", "size": "480x360", "crop": 512,
                          "dali_gpu": 2400.0, "torch": 800.0, "plain": 700.0},
                         {"input": "512x512", "size": "512x512", "crop": 512,
                          "dali_gpu": 2000.0, "torch": 500.0, "plain": 450.0}]}


def write_metrics(runs: Path, steps=(0, 1), nan_step=None):
    for s in steps:
        folder = runs / "gpu_check" / f"step_{s}"
        folder.mkdir(parents=True, exist_ok=True)
        curve = [3.0, 2.0, float("nan") if s == nan_step else 1.5]
        (folder / "metrics.json").write_text(json.dumps({
            "step": s, "seconds": 10.0, "iterations": 20, "train_images": 90,
            "loss_curve": curve, "miou_all": 0.05, "engine": "deepspeed"}))


JUNIT_OK = ('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" '
            'errors="0" failures="0" skipped="0" tests="2"><testcase classname="t" name="a"/>'
            '<testcase classname="t" name="b"/></testsuite></testsuites>')
FINAL_LINE = '{"run": "gpu_check", "final_miou_all": 0.04, "final_hiou": 0.01}'
DEVICE = {"name": "NVIDIA H100 80GB HBM3", "driver": "580.1", "capability": "9.0"}
VERSIONS = {"torch": "2.11.0", "torch_cuda": "13.0", "triton": "3.6.0", "deepspeed": "0.19.8",
            "ray": "2.60.0", "dali": "2.4.0", "python": "3.12.3"}


def fake_runner(gc, broken=()):
    """A runner that writes each part's canned outputs instead of running it; the parts in
    `broken` fail in their own way."""
    calls = []

    def run(part):
        calls.append(part.name)
        if part.name == "cuda_tests":
            part.outputs["junit"].write_text(JUNIT_OK)
            return gc.Outcome(0, 12.0, "2 passed\n")
        if part.name == "loss_bench":
            if "loss_bench" in broken:
                return gc.Outcome(1, 3.0, "Traceback ...\nRuntimeError: boom\n")
            part.outputs["json"].write_text(json.dumps(loss_json()))
            return gc.Outcome(0, 60.0, "wrote bench_loss.json\n")
        if part.name == "data_bench":
            if "data_bench" in broken:
                return gc.Outcome(None, 300.0, "building shards\n")
            part.outputs["json"].write_text(json.dumps(DATA_JSON))
            return gc.Outcome(0, 90.0, "wrote bench_data.json\n")
        write_metrics(part.outputs["runs"], nan_step=1 if "run" in broken else None)
        return gc.Outcome(0, 200.0, "lots of lines\n" * 2000 + FINAL_LINE + "\n")

    run.calls = calls
    return run


def test_report_from_canned_outputs(gc, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gc, "missing_modules", lambda part: [])
    out = tmp_path / "report.json"
    runner = fake_runner(gc)
    rc = gc.main(["--out", str(out), "--workdir", str(tmp_path / "w")], runner=runner,
                 has_cuda=lambda: True, describe=lambda: (DEVICE, VERSIONS))
    assert rc == 0 and runner.calls == list(gc.PARTS)
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["device"] == DEVICE
    assert report["versions"]["dali"] == "2.4.0" and report["versions"]["ray"] == "2.60.0"
    parts = report["parts"]
    assert list(parts) == list(gc.PARTS)
    assert all(p["status"] == "ok" and p["returncode"] == 0 for p in parts.values())
    assert parts["cuda_tests"]["numbers"]["passed"] == 2
    loss = parts["loss_bench"]["numbers"]
    assert loss["copy_gb_per_s"] == 3000.0 and loss["tap_mib"] == 222.0
    assert loss["impls"]["triton"] == {
        "ms": 2.0, "speedup_vs_eager": 5.0, "peak_extra_mib": 450.0, "memory_vs_eager": 0.45,
        "fraction_of_copy_bandwidth": 0.5, "first_call_s": 5.0, "loss_int": 0.0277,
        "loss_ext": 0.0018}
    data = parts["data_bench"]["numbers"]["inputs"]
    assert data["512x512 512x512"] == {"dali_gpu": 2000.0, "torch": 500.0, "plain": 450.0,
                                       "dali_gpu_vs_torch": 4.0}
    run = parts["run"]["numbers"]
    assert run["final_miou_all"] == 0.04 and [s["step"] for s in run["steps"]] == [0, 1]
    assert run["steps"][0]["images_per_s"] == 8.0 and run["steps"][1]["loss_last"] == 1.5
    assert parts["run"]["output_tail"].endswith(FINAL_LINE + "\n")
    assert len(parts["run"]["output_tail"]) == gc.TAIL_CHARS
    assert "tools/bench_loss.py --device cuda" in parts["loss_bench"]["command"]
    table = capsys.readouterr().out
    assert re.search(r"loss_bench\s+ok\s+60\.0\s+.*triton 2\.0 ms \(5\.00x eager", table)
    assert re.search(r"run\s+ok\s+200\.0\s+step 0: 20 it", table)


def test_a_failed_part_gives_exit_status_1(gc, tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "missing_modules", lambda part: [])
    out = tmp_path / "report.json"
    rc = gc.main(["--out", str(out), "--workdir", str(tmp_path / "w")],
                 runner=fake_runner(gc, broken=("loss_bench", "data_bench", "run")),
                 has_cuda=lambda: True, describe=lambda: (DEVICE, VERSIONS))
    assert rc == 1
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert report["ok"] is False and parts["cuda_tests"]["status"] == "ok"
    assert parts["loss_bench"]["status"] == "failed" and parts["loss_bench"]["returncode"] == 1
    assert "RuntimeError: boom" in parts["loss_bench"]["output_tail"]
    assert parts["data_bench"]["status"] == "timeout"
    assert parts["data_bench"]["returncode"] is None
    assert parts["run"]["status"] == "failed" and "not finite" in parts["run"]["reason"]


def test_exit_status_of_results(gc):
    def result(status):
        return gc.PartResult("run", status, 0, 1.0, [], "", {})

    assert gc.exit_code([result("ok"), result("ok")]) == 0
    for bad in ("failed", "timeout", "unavailable"):
        assert gc.exit_code([result("ok"), result(bad)]) == 1
    assert gc.exit_code([]) == 1


def test_a_part_fails_on_its_exit_status_or_its_outputs(gc, tmp_path):
    parts = gc.build_parts(tmp_path)
    loss = parts["loss_bench"]
    ok = gc.Outcome(0, 1.0, "")
    loss.outputs["json"].write_text(json.dumps(loss_json(triton_skipped=True)))
    r = gc.judge(loss, ok)
    assert r.status == "failed" and "triton skipped" in r.reason
    loss.outputs["json"].write_text(json.dumps(loss_json(nan=True)))
    assert "triton: loss not finite" in gc.judge(loss, ok).reason
    loss.outputs["json"].write_text(json.dumps(loss_json()))
    assert gc.judge(loss, ok).status == "ok"
    crashed = gc.judge(loss, gc.Outcome(1, 1.0, "Segmentation fault at exit"))
    assert (crashed.status, crashed.reason) == ("failed", "exit status 1")
    assert crashed.numbers["impls"]["triton"]["ms"] == 2.0  # what it wrote is still read

    data = parts["data_bench"]
    cpu_only = {"env": {}, "results": [{"input": "x", "size": "1x1", "dali_cpu": 5.0,
                                        "torch": 4.0, "plain": 3.0}]}
    data.outputs["json"].write_text(json.dumps(cpu_only))
    assert "no DALI-GPU rate" in gc.judge(data, ok).reason

    run = parts["run"]
    write_metrics(run.outputs["runs"], steps=(0,))
    assert "1 of 2 steps finished" in gc.judge(run, ok).reason
    assert gc.judge(parts["cuda_tests"], ok).reason == "pytest wrote no JUnit XML"


def test_parts_not_run_are_kept_from_the_same_devices_report(gc, tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "missing_modules", lambda part: [])
    out = tmp_path / "report.json"
    common = dict(has_cuda=lambda: True, describe=lambda: (DEVICE, VERSIONS))
    assert gc.main(["--out", str(out), "--workdir", str(tmp_path / "w1")],
                   runner=fake_runner(gc), **common) == 0
    runner = fake_runner(gc, broken=("run",))
    assert gc.main(["--parts", "run", "--out", str(out), "--workdir", str(tmp_path / "w2")],
                   runner=runner, **common) == 1
    assert runner.calls == ["run"]
    report = json.loads(out.read_text())
    assert list(report["parts"]) == list(gc.PARTS) and report["ok"] is False
    assert report["parts"]["loss_bench"]["status"] == "ok"
    assert report["parts"]["run"]["status"] == "failed"

    other = {**DEVICE, "name": "NVIDIA H200"}
    assert gc.main(["--parts", "loss_bench", "--out", str(out), "--workdir",
                    str(tmp_path / "w3")], runner=fake_runner(gc), has_cuda=lambda: True,
                   describe=lambda: (other, VERSIONS)) == 0
    report = json.loads(out.read_text())
    assert list(report["parts"]) == ["loss_bench"] and report["ok"] is False  # incomplete


def test_a_part_whose_modules_are_missing_is_unavailable(gc, tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "missing_modules",
                        lambda part: ["nvidia.dali"] if "nvidia.dali" in part.needs else [])
    runner = fake_runner(gc)
    out = tmp_path / "r.json"
    assert gc.main(["--out", str(out), "--workdir", str(tmp_path / "w")], runner=runner,
                   has_cuda=lambda: True, describe=lambda: (DEVICE, VERSIONS)) == 1
    assert runner.calls == ["cuda_tests", "loss_bench"]
    parts = json.loads(out.read_text())["parts"]
    assert parts["data_bench"]["status"] == parts["run"]["status"] == "unavailable"
    assert parts["run"]["reason"] == "cannot import nvidia.dali"


def test_missing_modules(gc):
    part = gc.Part("x", [], 1, ("json", "no_such_module_for_gpu_check", "nvidia.no_such"))
    assert gc.missing_modules(part) == ["no_such_module_for_gpu_check", "nvidia.no_such"]


def test_run_command_time_limit_and_failure(gc):
    slow = gc.Part("x", [sys.executable, "-c", "print('started'); import time; time.sleep(60)"],
                   2, ())
    outcome = gc.run_command(slow)
    assert outcome.returncode is None and "started" in outcome.output
    assert outcome.seconds < 30
    loss = gc.Part("loss_bench", slow.command, 2, (), {"json": Path("/nonexistent/x.json")})
    assert gc.judge(loss, outcome).status == "timeout"

    failing = gc.Part("x", [sys.executable, "-c",
                            "import sys; print('out'); sys.exit('err line')"], 30, ())
    outcome = gc.run_command(failing)
    assert outcome.returncode == 1 and "out" in outcome.output and "err line" in outcome.output


def test_slug(gc):
    assert gc.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gc.slug("NVIDIA H200") == "nvidia-h200"

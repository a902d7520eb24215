"""tools/gpu_check.py on a CPU: the no-CUDA exit, the default plan that fits a short device slot,
the commands of its parts (valid options and config keys), reading each part's outputs (the
run's observed dtypes included), the report JSON and the exit status."""

import dataclasses
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from icd_dist.config import EngineConfig, load_config, micro_batch_and_accumulation
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


def dry_run_plan(workdir: Path, *args: str) -> tuple[dict[str, list[list[str]]], str]:
    """({part: [argv, ...]}, the whole output) as the dry run prints them (where no CUDA is
    visible)."""
    proc = tool("--dry-run", "--workdir", str(workdir), *args)
    assert proc.returncode == 0, proc.stderr
    commands, name = {}, None
    for line in proc.stdout.splitlines():
        m = re.match(r"\[(\w+)\] ", line)
        if m:
            name = m.group(1)
            commands[name] = []
        elif line.startswith("  ") and name:
            argv = shlex.split(line)
            while "=" in argv[0] and not argv[0].startswith("/"):  # VAR=value prefixes
                argv.pop(0)
            commands[name].append(argv)
    return commands, proc.stdout


def dry_run_commands(workdir: Path, *args: str) -> dict[str, list[str]]:
    """{part: its (first) argv} as the dry run prints them."""
    return {k: v[0] for k, v in dry_run_plan(workdir, *args)[0].items()}


def test_dry_run_lists_the_default_plan_and_its_commands(gc, tmp_path):
    work = tmp_path / "work"
    commands = dry_run_commands(work)
    assert list(commands) == ["cuda_tests", "run", "loss_quick"] == list(gc.DEFAULT_PLAN)
    assert not work.exists()  # a dry run creates nothing

    tests = commands["cuda_tests"]
    assert tests[1:3] == ["-m", "pytest"]
    i = tests.index("cuda")
    assert tests[i - 1] == "-m" and tests[-1] == "tests"
    assert tests[tests.index("-k") + 1] == "not compiled"
    assert f"--junitxml={work / 'cuda_tests.xml'}" in tests

    loss = commands["loss_quick"]
    assert loss[1] == "tools/bench_loss.py"
    assert loss[loss.index("--device") + 1] == "cuda"
    assert loss[loss.index("--impls") + 1] == "eager,triton"  # no inductor compile
    assert "--batch" not in loss  # the real tap sizes
    assert loss[loss.index("--out") + 1] == str(work / "bench_loss_quick.json")

    run = commands["run"]
    assert run[1:5] == ["-m", "icd_dist.run", "--config", "configs/voc/15-1_icd.yaml"]
    assert run[run.index("--last-step") + 1] == "1"
    for override in ("engine.precision=bf16", "data.pipeline=dali", "engine.num_workers=1",
                     "engine.device=cuda", "model.pretrained=none", "data.dataset=synthetic",
                     "data.synthetic.classes=21", "data.crop_size=512", "optim.iterations=12",
                     "optim.iterations_incremental=4"):
        assert override in run, override
    # the teacher runs in the config's default dtype (fp32 weights under the student's
    # autocast), not a forced bf16 copy
    assert not [a for a in run if a.startswith("engine.teacher_dtype=")]
    assert f"run.storage_path={work / 'runs'}" in run

    everything = dry_run_commands(work, "--parts", "all")
    assert list(everything) == list(gc.PARTS)
    data = everything["data_bench"]
    assert data[1] == "tools/bench_data.py"
    assert data[data.index("--dali-device") + 1] == "gpu"
    assert data[data.index("--out") + 1] == str(work / "bench_data.json")
    assert everything["loss_bench"][everything["loss_bench"].index("--out") + 1] == \
        str(work / "bench_loss.json")
    assert "-k" in everything["cuda_compiled"] and \
        everything["cuda_compiled"][everything["cuda_compiled"].index("-k") + 1] == "compiled"


def test_the_default_plan_fits_a_short_slot_and_the_dry_run_says_so(gc, tmp_path):
    parts = gc.build_parts(tmp_path)
    total = sum(parts[n].timeout for n in gc.DEFAULT_PLAN)
    assert total <= 480 and gc.SLOT_SECONDS == 480
    assert set(gc.DEFAULT_PLAN) >= {"run", "cuda_tests"}
    _, text = dry_run_plan(tmp_path)
    assert f"default plan: cuda_tests 120 + run 285 + loss_quick 75 = {total:.0f} s of time " \
           "limits, within the 480 s" in text
    assert re.search(r"not in it: cuda_compiled \(300 s\), loss_bench \(600 s\), data_bench "
                     r"\(600 s\), channels_last \(600 s\)", text)
    for name in gc.DEFAULT_PLAN:  # the docstring's table holds the same limits
        assert re.search(rf"^  {name} +{parts[name].timeout:.0f}  ", gc.__doc__, re.M), name
    # a selection's total counts only what it selects; over 480 s it says by how much
    _, text = dry_run_plan(tmp_path, "--parts", "run,channels_last")
    assert "selected parts: run 285 + channels_last 600 = 885 s of time limits, over, by " \
           "405 s, the 480 s" in text
    _, text = dry_run_plan(tmp_path, "--timeout", "100")  # --timeout replaces each limit
    assert "= 300 s of time limits, within" in text


def test_dry_run_of_selected_parts_quick(tmp_path):
    commands = dry_run_commands(tmp_path, "--parts", "loss_bench,run,channels_last", "--quick")
    assert list(commands) == ["loss_bench", "run", "channels_last"]
    assert "--batch" in commands["loss_bench"]
    assert "optim.iterations=12" in commands["run"]  # one size in the default plan
    assert "optim.iterations=12" in commands["channels_last"]  # 40 without --quick
    assert "optim.iterations=40" in dry_run_commands(tmp_path, "--parts",
                                                     "channels_last")["channels_last"]
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
    assert cfg.engine.precision == "bf16"
    assert cfg.engine.teacher_dtype == EngineConfig().teacher_dtype  # the default
    assert (cfg.data.pipeline, cfg.engine.device, cfg.engine.num_workers) == ("dali", "cuda", 1)
    assert cfg.engine.engine == "deepspeed"
    assert micro_batch_and_accumulation(cfg) == (2, 2)  # gradient accumulation is exercised
    assert cfg.optim.iterations and cfg.optim.iterations_incremental
    assert cfg.data.train_shards == str(tmp_path / "data" / "train")


def test_channels_last_runs_the_run_twice_false_then_true(gc, tmp_path):
    commands = dry_run_plan(tmp_path, "--parts", "run,channels_last")[0]
    run, pair = commands["run"][0], commands["channels_last"]
    assert len(pair) == 2
    settings = []
    for argv in pair:
        rest = [a for a in argv if not a.startswith(("run.name=", "engine.channels_last="))]
        # the run's command but for its name, its folders, its budget and the setting
        assert [re.sub(r"=.*/channels_last/", "=" + str(tmp_path) + "/", a) for a in rest
                if not a.startswith("optim.iterations")] == \
            [a for a in run if not a.startswith(("run.name=", "optim.iterations"))]
        settings += [a for a in argv if a.startswith("engine.channels_last=")]
        cfg_args = [a for a in argv if "=" in a and not a.startswith(("-", "engine.channels"))]
        load_config(ROOT / argv[argv.index("--config") + 1], cfg_args)
    assert settings == ["engine.channels_last=false", "engine.channels_last=true"]
    names = [a for argv in pair for a in argv if a.startswith("run.name=")]
    assert len(set(names)) == 2
    if "channels_last" not in {f.name for f in dataclasses.fields(EngineConfig)}:
        pytest.skip("engine.channels_last is not a config key yet (being added)")
    for argv, want in zip(pair, (False, True), strict=True):
        cfg = load_config(ROOT / argv[argv.index("--config") + 1],
                          [a for a in argv if "=" in a and not a.startswith("-")])
        assert cfg.engine.channels_last is want


def _help(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=NO_CUDA)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("part", ["loss_quick", "loss_bench", "data_bench", "run"])
def test_the_commands_options_exist(tmp_path, part):
    """Every --option of a part's command is one its script takes, with an allowed value."""
    argv = dry_run_commands(tmp_path, "--parts", "all")[part]
    if "--impls" in argv:
        from icd_dist.losses.kernels.dispatch import IMPLS

        assert set(argv[argv.index("--impls") + 1].split(",")) <= set(IMPLS)
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


def _collect(*argvs: list[str]) -> list[set[str]]:
    """The test ids each pytest command line collects, the collections run side by side."""
    procs = [subprocess.Popen([sys.executable, *argv[1:]], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=NO_CUDA)
             for argv in argvs]
    ids = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode in (0, 5), out[-3000:]  # 5: none collected
            ids.append({line for line in out.splitlines() if "::" in line})
    finally:
        for proc in procs:  # the others, where one failed or timed out
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return ids


def test_the_two_cuda_parts_split_the_cuda_tests(tmp_path):
    """cuda_tests (default plan) and cuda_compiled each collect tests, none twice, and
    together every test marked cuda."""
    commands = dry_run_commands(tmp_path, "--parts", "cuda_tests,cuda_compiled")
    argvs = {name: [a for a in argv if not a.startswith("--junitxml")] + ["--collect-only"]
             for name, argv in commands.items()}
    argv = argvs["cuda_tests"]
    k = argv.index("-k")
    argvs["every"] = argv[:k] + argv[k + 2:]  # the same pytest without the part's -k
    ids = dict(zip(argvs, _collect(*argvs.values()), strict=True))
    for name in commands:
        assert ids[name] and all("cuda" in i for i in ids[name]), name
    assert not ids["cuda_tests"] & ids["cuda_compiled"]
    assert all("compiled" in i for i in ids["cuda_compiled"])
    assert ids["cuda_tests"] | ids["cuda_compiled"] == ids["every"]


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


BF16 = {"taps": ["bfloat16"] * 5, "logits": "bfloat16", "teacher_logits": "bfloat16"}


def write_metrics(runs: Path, steps=(0, 1), nan_step=None, name="gpu_check", seconds=10.0,
                  precision="bf16", observed=BF16, channels_last=None):
    """Each step's metrics.json as a run writes it (under runs/<name>/), with `observed` as
    its observed_dtypes (the teacher's logits None at step 0; `observed` None: no such key),
    and the run's config.yaml when `channels_last` is given."""
    for s in steps:
        folder = runs / name / f"step_{s}"
        folder.mkdir(parents=True, exist_ok=True)
        curve = [3.0, 2.0, float("nan") if s == nan_step else 1.5]
        m = {"step": s, "seconds": seconds, "iterations": 20, "train_images": 90,
             "loss_curve": curve, "miou_all": 0.05, "engine": "deepspeed",
             "precision": precision, "weights_dtype": "float32", "teacher_dtype":
             "float32" if s else None}
        if observed is not None:
            m["observed_dtypes"] = {**observed, "teacher_logits":
                                    observed["teacher_logits"] if s else None}
        (folder / "metrics.json").write_text(json.dumps(m))
    if channels_last is not None:
        (runs / name / "config.yaml").write_text(
            f"engine:\n  precision: {precision}\n  channels_last: {str(channels_last).lower()}\n")


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
        if part.name in ("cuda_tests", "cuda_compiled"):
            part.outputs["junit"].write_text(JUNIT_OK)
            return gc.Outcome(0, 12.0, "2 passed\n")
        if part.name == "channels_last":
            for setting, seconds in (("false", 10.0), ("true", 8.0)):
                folder = part.outputs[setting]
                write_metrics(folder.parent, name=folder.name, seconds=seconds,
                              channels_last=setting == "true")
            return gc.Outcome(0, 400.0, "two runs\n")
        if part.name in ("loss_bench", "loss_quick"):
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
    rc = gc.main(["--out", str(out), "--workdir", str(tmp_path / "w0")], runner=runner,
                 has_cuda=lambda: True, describe=lambda: (DEVICE, VERSIONS))
    assert rc == 0 and runner.calls == list(gc.DEFAULT_PLAN)  # the default plan only
    report = json.loads(out.read_text())
    assert list(report["parts"]) == list(gc.DEFAULT_PLAN)
    assert report["default_plan_ok"] is True and report["ok"] is False  # not every part
    capsys.readouterr()
    out.unlink()
    runner = fake_runner(gc)
    rc = gc.main(["--parts", "all", "--out", str(out), "--workdir", str(tmp_path / "w")],
                 runner=runner, has_cuda=lambda: True, describe=lambda: (DEVICE, VERSIONS))
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
    assert run["steps"][1]["observed_dtypes"] == BF16 and run["steps"][1]["precision"] == "bf16"
    assert run["steps"][1]["teacher_weights"] == "float32"
    cl = parts["channels_last"]["numbers"]
    assert (cl["false"]["images_per_s"], cl["true"]["images_per_s"], cl["true_vs_false"]) == \
        (8.0, 10.0, 1.25)  # 4 x 40 iterations in 20 s and in 16 s
    assert [s["images_per_s"] for s in cl["true"]["steps"]] == [10.0, 10.0]
    assert parts["channels_last"]["command"].count("python -m icd_dist.run") == 2
    assert parts["run"]["output_tail"].endswith(FINAL_LINE + "\n")
    assert len(parts["run"]["output_tail"]) == gc.TAIL_CHARS
    assert "tools/bench_loss.py --device cuda" in parts["loss_bench"]["command"]
    table = capsys.readouterr().out
    assert re.search(r"loss_bench\s+ok\s+60\.0\s+.*triton 2\.0 ms \(5\.00x eager", table)
    assert re.search(r"run\s+ok\s+200\.0\s+step 0: 20 it.*, bf16: bfloat16", table)
    assert re.search(r"channels_last\s+ok\s+400\.0\s+false 8\.0 img/s, true 10\.0 img/s; "
                     r"true/false 1\.250", table)


def test_a_failed_part_gives_exit_status_1(gc, tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "missing_modules", lambda part: [])
    out = tmp_path / "report.json"
    rc = gc.main(["--parts", "all", "--out", str(out), "--workdir", str(tmp_path / "w")],
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
        return gc.PartResult("run", status, 0, 1.0, "", "", {})

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


def run_result(gc, tmp_path, **metrics):
    """The run part judged on metrics.json files written by write_metrics(**metrics)."""
    part = gc.build_parts(tmp_path)["run"]
    write_metrics(part.outputs["runs"], **metrics)
    return gc.judge(part, gc.Outcome(0, 1.0, FINAL_LINE + "\n"))


def test_the_run_passes_when_its_observed_dtypes_are_its_precisions(gc, tmp_path):
    r = run_result(gc, tmp_path)
    assert (r.status, r.reason) == ("ok", None)
    steps = r.numbers["steps"]
    assert [s["observed_dtypes"] for s in steps] == [{**BF16, "teacher_logits": None}, BF16]
    assert [s["precision"] for s in steps] == ["bf16", "bf16"]
    fp32 = {"taps": ["float32"] * 5, "logits": "float32", "teacher_logits": "float32"}
    part = gc.build_parts(tmp_path / "b")["run"]
    part.precision = None  # a run configured in fp32 would pass with float32 tensors
    write_metrics(part.outputs["runs"], precision="fp32", observed=fp32)
    assert gc.judge(part, gc.Outcome(0, 1.0, "")).status == "ok"


def test_the_run_fails_on_a_float32_tap_in_a_bf16_run(gc, tmp_path):
    taps = ["bfloat16", "bfloat16", "float32", "bfloat16", "bfloat16"]
    r = run_result(gc, tmp_path, observed={**BF16, "taps": taps})
    assert r.status == "failed" and "\n" not in r.reason
    assert r.reason == "step 0: observed tap 2 float32; expected bfloat16 (precision bf16); " \
                       "step 1: observed tap 2 float32; expected bfloat16 (precision bf16)"
    assert r.numbers["steps"][0]["observed_dtypes"]["taps"] == taps  # recorded as seen
    r = run_result(gc, tmp_path / "all", observed={**BF16, "taps": ["float32"] * 5})
    assert r.reason.startswith("step 0: observed tap 0 float32, tap 1 float32, tap 2 float32, "
                               "tap 3 float32, tap 4 float32; expected bfloat16")


@pytest.mark.parametrize(("observed", "precision", "reason"), [
    ({**BF16, "logits": "float32"}, "bf16",
     "step 1: observed logits float32; expected bfloat16 (precision bf16)"),
    ({**BF16, "teacher_logits": "float32"}, "bf16",
     "step 1: observed teacher_logits float32; expected bfloat16 (precision bf16)"),
    ({**BF16, "teacher_logits": None}, "bf16",
     "step 1: observed_dtypes has no teacher_logits after step 0"),
    ({**BF16, "taps": []}, "bf16", "step 1: observed_dtypes has no feature taps"),
    ({"taps": ["float32"] * 5, "logits": "float32", "teacher_logits": "float32"}, "fp32",
     "step 1: precision fp32, the run was configured with bf16"),
    ({**BF16, "taps": ["float16"] * 5}, "fp16",
     "step 1: precision fp16, the run was configured with bf16"),
])
def test_the_run_fails_on_each_wrong_dtype(gc, tmp_path, observed, precision, reason):
    r = run_result(gc, tmp_path, observed=observed, precision=precision)
    assert r.status == "failed" and reason in r.reason, r.reason


def test_the_run_fails_when_metrics_cannot_show_their_dtypes(gc, tmp_path):
    r = run_result(gc, tmp_path, observed=None)  # a run older than observed_dtypes
    assert r.status == "failed"
    assert r.reason.startswith("step 0: metrics.json has no observed_dtypes (a run that does "
                               "not record them cannot show its bf16 dtypes)")
    assert r.numbers["steps"][0]["observed_dtypes"] is None
    r = run_result(gc, tmp_path / "p", precision=None)
    assert r.status == "failed" and "step 0: precision None is none of fp32, bf16, fp16" \
        in r.reason


def test_channels_last_numbers_and_problems(gc, tmp_path):
    part = gc.build_parts(tmp_path, quick=True)["channels_last"]
    assert part.precision == "bf16" and len(part.commands) == 2
    ok = gc.Outcome(0, 1.0, "")
    for setting, seconds in (("false", 16.0), ("true", 10.0)):
        write_metrics(part.outputs[setting].parent, name=part.outputs[setting].name,
                      seconds=seconds, channels_last=setting == "true")
    r = gc.judge(part, ok)
    assert (r.status, r.reason) == ("ok", None)
    assert (r.numbers["false"]["images_per_s"], r.numbers["true"]["images_per_s"],
            r.numbers["true_vs_false"]) == (5.0, 8.0, 1.6)
    # the true run's config says false: the setting did not reach it
    write_metrics(part.outputs["true"].parent, name="gpu_check_cl_true", seconds=10.0,
                  channels_last=False)
    assert gc.judge(part, ok).reason == \
        "channels_last=true: its config.yaml has engine.channels_last False"
    write_metrics(part.outputs["true"].parent, name="gpu_check_cl_true", seconds=10.0,
                  channels_last=True, observed={**BF16, "logits": "float32"})
    assert gc.judge(part, ok).reason.startswith("channels_last=true: step 0: observed logits "
                                                "float32; expected bfloat16")
    part = gc.build_parts(tmp_path / "one")["channels_last"]
    write_metrics(part.outputs["false"].parent, name="gpu_check_cl_false")
    r = gc.judge(part, gc.Outcome(None, 600.0, ""))
    assert r.status == "timeout" and r.numbers["true_vs_false"] is None
    assert r.numbers["true"] == {"steps": [], "images_per_s": None}


def test_run_command_runs_each_command_within_one_limit(gc, tmp_path):
    first = [sys.executable, "-c", "import sys; print('first'); sys.exit(3)"]
    second = [sys.executable, "-c", "print('second')"]
    part = gc.Part("x", first, 60, (), then=[second])
    outcome = gc.run_command(part)
    assert outcome.returncode == 3  # the first failure, though the second ran
    assert outcome.output.index("first") < outcome.output.index("second")
    assert f"$ {shlex.join(second)}" in outcome.output
    assert gc.run_command(gc.Part("x", second, 60, (), then=[second])).returncode == 0
    slow = [sys.executable, "-c", "import time; time.sleep(3)"]
    part = gc.Part("x", slow, 4, (), then=[slow, second])  # 3 s + 3 s > 4 s
    outcome = gc.run_command(part)
    assert outcome.returncode is None and "second" not in outcome.output.splitlines()
    assert outcome.seconds < 30


def test_the_report_is_written_after_each_part(gc, tmp_path, monkeypatch):
    """A slot that ends during a part keeps the parts that finished before it."""
    monkeypatch.setattr(gc, "missing_modules", lambda part: [])
    out = tmp_path / "report.json"
    canned = fake_runner(gc)

    def runner(part):
        if part.name == "run":
            assert json.loads(out.read_text())["parts"]["cuda_tests"]["status"] == "ok"
            raise KeyboardInterrupt  # the slot ends
        return canned(part)

    with pytest.raises(KeyboardInterrupt):
        gc.main(["--out", str(out), "--workdir", str(tmp_path / "w")], runner=runner,
                has_cuda=lambda: True, describe=lambda: (DEVICE, VERSIONS))
    assert list(json.loads(out.read_text())["parts"]) == ["cuda_tests"]


def test_parts_not_run_are_kept_from_the_same_devices_report(gc, tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "missing_modules", lambda part: [])
    out = tmp_path / "report.json"
    common = dict(has_cuda=lambda: True, describe=lambda: (DEVICE, VERSIONS))
    assert gc.main(["--parts", "all", "--out", str(out), "--workdir", str(tmp_path / "w1")],
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
    assert gc.main(["--parts", "all", "--out", str(out), "--workdir", str(tmp_path / "w")],
                   runner=runner, has_cuda=lambda: True,
                   describe=lambda: (DEVICE, VERSIONS)) == 1
    assert runner.calls == ["cuda_tests", "loss_quick", "cuda_compiled", "loss_bench"]
    parts = json.loads(out.read_text())["parts"]
    assert parts["data_bench"]["status"] == parts["run"]["status"] == \
        parts["channels_last"]["status"] == "unavailable"
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

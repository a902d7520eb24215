"""RunFolder: every run-folder path in one class (local disk here; the S3 test covers object
stores), and no other module of the package spelling those paths itself."""

import re
from pathlib import Path

import pytest
import torch

from icd_dist.train.run_folder import RunFolder

ROOT = Path(__file__).resolve().parents[2]


def test_steps_models_metrics_and_done(tmp_path):
    run = RunFolder(str(tmp_path / "run"))
    assert not run.exists() and run.done_steps(3) == []
    run.write_config("run: {name: x}\n")
    assert run.has_config() and run.read_config() == "run: {name: x}\n"
    run.save_model(0, {"state_dict": {"w": torch.ones(2)}, "classes_per_step": [3]})
    run.write_metrics(0, {"step": 0, "miou_all": 0.5})
    assert not run.is_done(0)  # the marker comes last
    run.mark_done(0)
    assert run.is_done(0) and run.done_steps(3) == [0]
    assert run.read_metrics(0)["miou_all"] == 0.5
    assert torch.equal(run.load_model(0)["state_dict"]["w"], torch.ones(2))
    other = RunFolder(str(tmp_path / "other"))
    other.copy_step(0, run)
    assert other.is_done(0) and other.read_metrics(0) == run.read_metrics(0)
    with pytest.raises(FileNotFoundError, match="not a finished step"):
        other.copy_step(1, run)
    assert run.child("trials").uri() == str(tmp_path / "run" / "trials")
    assert run.progress(2) == "step_2/progress.log"
    assert run.local_step_dir(1, "x") == tmp_path / "run" / "step_1"


def test_only_run_folder_spells_run_folder_paths():
    pattern = re.compile(r"""f?["'](step_\{|[^"']*/(model\.pt|metrics\.json|DONE)["'])""")
    offenders = []
    for path in (ROOT / "icd_dist").rglob("*.py"):
        if path.name == "run_folder.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []

"""The README's two set-up commands are what CI runs and what the package provides."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def setup_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_exactly_two_setup_commands():
    commands = setup_commands()
    assert len(commands) == 2, commands
    main_cmd, test_cmd = commands
    assert "pip install" in main_cmd and "python -m icd_dist." in main_cmd
    assert "pip install -e '.[dev]'" in test_cmd and "pytest" in test_cmd


def test_ci_runs_the_readme_test_command():
    test_cmd = setup_commands()[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci_lines, "README test command differs from .ci/run"

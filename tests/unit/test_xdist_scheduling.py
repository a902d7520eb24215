"""The suite's two pytest-xdist workers: every test that starts Ray in one work unit, run one
test after another by one worker (tests/conftest.py); the others spread over both."""

from pathlib import Path

import pytest

from tests import conftest

ROOT = Path(__file__).resolve().parents[2]


def test_every_ray_test_shares_one_work_unit_and_the_rest_are_spread(request, monkeypatch):
    pytest.importorskip("xdist")
    monkeypatch.setattr(request.config.option, "tx", ["2*popen"])  # as `-n 2` sets it
    sched = request.config.hook.pytest_xdist_make_scheduler(config=request.config, log=None)
    modules = sorted(p.relative_to(ROOT).as_posix()
                     for p in (ROOT / "tests" / "integration").glob("test_*.py"))
    ray_modules = [m for m in modules if m not in conftest.RAY_FREE]
    assert len(ray_modules) >= 8
    for module in ray_modules:
        for test in ("test_x", "test_x[ddp]"):
            assert sched._split_scope(f"{module}::{test}") == "ray", module
    # every listed Ray-free test exists, and is a unit of its own
    for entry in conftest.RAY_FREE:
        module, _, test = entry.partition("::")
        assert (ROOT / module).is_file(), entry
        assert not test or f"def {test}(" in (ROOT / module).read_text(), entry
        nodeid = entry if test else f"{entry}::test_x"
        assert sched._split_scope(nodeid) == nodeid
    assert sched._split_scope("tests/unit/test_config.py::test_x") == \
        "tests/unit/test_config.py::test_x"

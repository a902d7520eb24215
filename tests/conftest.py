"""Shared fixtures: tiny made-up datasets in the raw layouts, and the CamVid data when present."""

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Without CUDA the Triton kernels are checked by Triton's interpreter; triton.jit reads this
# when the kernels' module is imported, so it is set before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A compiled-path test that ran eagerly because dynamo gave up would pass for the wrong reason.
torch._dynamo.config.fail_on_recompile_limit_hit = True

CAMVID = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "camvid"

# Integration tests (modules, or single tests) that start no Ray: tools, in-process runs and
# plain subprocesses. They run beside the Ray tests, so the fixture below checks that no Ray
# session appears under their own RAY_TMPDIR.
RAY_FREE = (
    "tests/integration/test_bench_data.py", "tests/integration/test_bench_loss.py",
    "tests/integration/test_bench_shard_reads.py",
    "tests/integration/test_css_benchmark.py",
    "tests/integration/test_console.py::test_skipped_sample_named_once_and_counted_once",
    "tests/integration/test_runner.py::test_deepspeed_and_ddp_same_loss_curve",
    "tests/integration/test_s3_storage.py::test_shards_read_from_s3_equal_local",
)


def ray_scope(nodeid: str) -> str:
    """The pytest-xdist work unit of a test: "ray" for every integration test that starts Ray,
    else the test itself (see pytest_xdist_make_scheduler)."""
    if nodeid.startswith("tests/integration/") and not nodeid.startswith(RAY_FREE):
        return "ray"
    return nodeid


@pytest.fixture(autouse=True)
def ray_free_tests_start_no_ray(request, monkeypatch):
    """A RAY_FREE integration test, and every process it starts, gets a RAY_TMPDIR of its
    own; a Ray session created there fails the test (it would run beside the Ray tests).
    The folder is short: Ray's socket paths under it must stay within 107 bytes."""
    nodeid = request.node.nodeid
    if not nodeid.startswith("tests/integration/") or ray_scope(nodeid) == "ray":
        yield
        return
    folder = Path(tempfile.mkdtemp(prefix="rayfree-"))
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    try:
        yield
        sessions = sorted(p.name for p in (folder / "ray").glob("session_*"))
        assert not sessions, (f"{nodeid} is listed in tests/conftest.py's RAY_FREE but "
                              f"started Ray ({sessions})")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under `-n 2` (the README's test command) the tests that start Ray run one after another
    in one worker process, as they must: some check that no Ray answers or start a second
    instance on purpose, and two at once would compete for the machine's 2 cores. The other
    worker meanwhile runs the rest of the suite, mostly single-threaded, on
    the core a Ray test leaves idle about a quarter of its time. (xdist's own
    `--dist loadgroup` reads its groups from node ids that pytest 9.2 no longer lets it
    change.) The "ray" unit is the largest, so xdist hands it out first."""
    from xdist.scheduler import LoadScopeScheduling

    class RayTestsInOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return ray_scope(nodeid)

    return RayTestsInOneWorker(config, log)


def camvid_root() -> Path:
    """../shared/data/camvid, or skip the test with the reason."""
    root = CAMVID.resolve()
    if not (root / "train.txt").is_file():
        pytest.skip(f"CamVid data not found at {root} (it ships beside the project in CI; "
                    "a fresh clone without ../shared skips this test)")
    return root


def write_jpeg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, "JPEG", quality=95)


def write_label(path: Path, ids: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(ids.astype(np.uint8), mode="P" if palette else "L")
    if palette:
        pal = []
        for i in range(256):  # colours unrelated to the indices
            pal += [(i * 37) % 256, (i * 91) % 256, (i * 53) % 256]
        img.putpalette(pal)
    img.save(path)


def block_label(class_ids: list[int], height: int = 48, width: int = 64) -> np.ndarray:
    """Vertical bands, one per class id (the first id also fills the rest)."""
    lab = np.full((height, width), class_ids[0], dtype=np.uint8)
    band = width // max(1, len(class_ids))
    for k, c in enumerate(class_ids):
        lab[:, k * band:(k + 1) * band] = c
    return lab


def image_for(label: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = label.astype(np.int64)
    img = np.stack([lab * 9 % 256, lab * 5 % 256, np.full_like(lab, 100)], -1)
    return np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)


# VOC 15-1 style class sets for the made-up folders.
VOC_SAMPLES = {
    "2007_000001": [0, 1, 2], "2007_000002": [0, 5, 16, 255], "2007_000003": [0, 17],
    "2007_000004": [0, 16, 17], "2007_000005": [0, 3, 20], "2008_000006": [15, 19],
}
ADE_SAMPLES = {
    "ADE_train_00000001": [0, 1, 50], "ADE_train_00000002": [0, 101, 120],
    "ADE_train_00000003": [2, 3, 150], "ADE_train_00000004": [0, 140],
}


@pytest.fixture
def voc_root(tmp_path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    lines = []
    for i, (key, classes) in enumerate(VOC_SAMPLES.items()):
        lab = block_label(classes)
        write_jpeg(root / "JPEGImages" / f"{key}.jpg", image_for(lab, i))
        write_label(root / "SegmentationClassAug" / f"{key}.png", lab, palette=True)
        lines.append(f"/JPEGImages/{key}.jpg /SegmentationClassAug/{key}.png")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def ade_root(tmp_path) -> Path:
    root = tmp_path / "ADEChallengeData2016"
    for i, (key, classes) in enumerate(ADE_SAMPLES.items()):
        lab = block_label(classes)
        write_jpeg(root / "images" / "training" / f"{key}.jpg", image_for(lab, i))
        write_label(root / "annotations" / "training" / f"{key}.png", lab)
    return root


@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt to start or attach to Ray (directly, by the schedule or by the sweep)
    fails the test: for checks that must stop a run before Ray starts."""
    import ray

    from icd_dist.train import schedule, sweep

    def fail(*args, **kwargs):
        pytest.fail("Ray was started before the run's pre-start checks stopped it")

    monkeypatch.setattr(ray, "init", fail)
    monkeypatch.setattr(schedule, "init_ray", fail)
    monkeypatch.setattr(sweep, "init_ray", fail)

"""Before Ray starts, `icd_dist.run` checks the shards it will read against their manifests: a
truncated or checksum-mismatched shard stops it with one line naming the shard and why, exit
status 2, no run folder, and Ray never started."""

from pathlib import Path

import pytest

from icd_dist.config import load_config
from icd_dist.data.errors import BadShardError
from icd_dist.data.manifest import load_manifest
from icd_dist.data.synthetic import build_synthetic
from icd_dist.data.verify import check_run_shards

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
TINY = ["data.dataset=synthetic", "data.synthetic.classes=4", "task.name=2-1",
        "model.backbone=resnet18", "model.head_channels=16",
        "model.norm=groupnorm", "engine.num_workers=1", "optim.batch_size=4"]


@pytest.fixture
def shards(tmp_path):
    """Synthetic train and val shard folders (one shard each)."""
    for split, num, seed in (("train", 12, 0), ("val", 6, 1)):
        build_synthetic(tmp_path / "data" / split, num, 4, (32, 32), seed=seed, progress=False)
    return tmp_path / "data"


def shard_file(folder):
    return folder / load_manifest(folder).shards[0].name


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:-1024])


def flip_padding_byte(path):
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # in the tar's zero padding: same size, every sample still reads
    path.write_bytes(bytes(data))


def run_main(shards, tmp_path, *overrides):
    from icd_dist import run

    return run.main(["--config", str(DEMO), *TINY,
                     f"data.train_shards={shards / 'train'}",
                     f"data.eval_shards={shards / 'val'}",
                     f"run.storage_path={tmp_path / 'runs'}", *overrides])


@pytest.mark.parametrize(("damage", "split", "reason"), [
    (truncate, "train", "bytes, manifest says"),
    (flip_padding_byte, "val", "sha256 mismatch"),
], ids=["truncated-train-shard", "checksum-mismatch-eval-shard"])
def test_bad_shard_stops_run_before_ray(no_ray, shards, tmp_path, capsys, damage, split,
                                        reason):
    path = shard_file(shards / split)
    damage(path)
    assert run_main(shards, tmp_path) == 2
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert len(lines) == 1, out.err
    assert lines[0].startswith("error: ") and f"shard {path.name}: " in lines[0]
    assert reason in lines[0] and str(shards / split) in lines[0]
    assert out.out == ""  # no result line
    assert not (tmp_path / "runs").exists()  # no run folder


def test_verify_false_checks_sizes_only(shards):
    folder = shards / "train"
    manifest = load_manifest(folder)
    keys = [s.key for s in manifest.samples]
    flip_padding_byte(shard_file(folder))
    assert check_run_shards(str(folder), manifest, keys, checksums=False).ok
    with pytest.raises(BadShardError, match="sha256 mismatch"):
        check_run_shards(str(folder), manifest, keys, checksums=True)
    truncate(shard_file(folder))
    with pytest.raises(BadShardError, match="truncated or replaced"):
        check_run_shards(str(folder), manifest, keys, checksums=False)


def test_only_the_shards_of_the_selected_samples_are_checked(tmp_path):
    folder = tmp_path / "many"
    build_synthetic(folder, 12, 4, (32, 32), shard_size="1KB", progress=False)
    manifest = load_manifest(folder)
    assert len(manifest.shards) > 1
    first, second = manifest.shards[0].name, manifest.shards[1].name
    truncate(folder / second)
    in_first = [s.key for s in manifest.samples if s.shard == first]
    assert check_run_shards(str(folder), manifest, in_first).num_shards == 1
    with pytest.raises(BadShardError, match=second):
        check_run_shards(str(folder), manifest, [s.key for s in manifest.samples])


def test_skip_mode_reports_bad_shards_and_goes_on(shards):
    from icd_dist.train.schedule import check_shards

    folder = shards / "train"
    manifest = load_manifest(folder)
    flip_padding_byte(shard_file(folder))
    keys = [s.key for s in manifest.samples]
    logs = []
    cfg = load_config(None, [*TINY, "data.bad_samples=skip"])
    check_shards(cfg, [(str(folder), manifest, keys)], logs.append)
    assert len(logs) == 1 and logs[0].startswith("warning: bad shards in ")
    assert "sha256 mismatch" in logs[0] and "skipped and named" in logs[0]
    with pytest.raises(BadShardError):
        check_shards(load_config(None, TINY), [(str(folder), manifest, keys)], logs.append)

"""Building, verifying and inspecting shards; selection from the manifest equals the
selection that `icd_dist.tasks` makes from the label files."""

import json
import tarfile
from pathlib import Path

import pytest

from icd_dist import shards as shards_cli
from icd_dist import tasks as tasks_cli
from icd_dist.css import get_dataset, get_task
from icd_dist.data.inspect import inspect_shards, selected_keys
from icd_dist.data.manifest import load_manifest, write_step_index
from icd_dist.data.readers import list_samples
from icd_dist.data.shard_writer import build_shards, parse_size, plan_shards
from icd_dist.data.verify import verify_shards
from tests.conftest import ADE_SAMPLES, VOC_SAMPLES, camvid_root


def run(capsys, module, argv):
    code = module.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def manifest_counts(capsys, folder, dataset, task, setting):
    code, out, err = run(capsys, shards_cli, ["inspect", str(folder), "--dataset", dataset,
                                              "--task", task, "--setting", setting, "--json"])
    assert code == 0, err
    return [s["num_images"] for s in json.loads(out)["task"]["steps"]]


def label_counts(capsys, dataset, task, setting, labels, list_file=None):
    argv = ["--dataset", dataset, "--task", task, "--setting", setting, "--labels",
            str(labels), "--json", "--workers", "1"]
    if list_file:
        argv += ["--list", str(list_file)]
    code, out, err = run(capsys, tasks_cli, argv)
    assert code == 0, err
    return [s["num_images"] for s in json.loads(out)["steps"]]


def test_voc_layout_build_verify_inspect(voc_root, tmp_path, capsys):
    out = tmp_path / "voc_shards"
    code, stdout, err = run(capsys, shards_cli, [
        "build", "--dataset", "voc", "--root", str(voc_root.parent), "--split", "train_aug",
        "--out", str(out), "--shard-size", "5KB", "--workers", "2"])
    assert code == 0, err
    manifest = load_manifest(out)
    assert len(manifest.samples) == len(VOC_SAMPLES) and len(manifest.shards) > 1
    # classes come from palette indices, not colours
    assert {s.key: list(s.classes) for s in manifest.samples} == VOC_SAMPLES
    code, stdout, _ = run(capsys, shards_cli, ["verify", str(out), "--decode"])
    assert code == 0 and "OK" in stdout
    for setting in ("overlap", "disjoint"):
        for task in ("15-1", "15-5", "10-1"):
            assert manifest_counts(capsys, out, "voc", task, setting) == label_counts(
                capsys, "voc", task, setting, voc_root / "SegmentationClassAug")


def test_ade_layout_build_and_counts(ade_root, tmp_path, capsys):
    out = tmp_path / "ade_shards"
    code, _, err = run(capsys, shards_cli, ["build", "--dataset", "ade20k", "--root",
                                            str(ade_root), "--split", "train", "--out", str(out)])
    assert code == 0, err
    manifest = load_manifest(out)
    assert {s.key: list(s.classes) for s in manifest.samples} == ADE_SAMPLES
    assert verify_shards(out, decode=True, progress=False).ok
    for task in ("100-50", "100-10", "50-50"):
        for setting in ("overlap", "disjoint"):
            assert manifest_counts(capsys, out, "ade20k", task, setting) == label_counts(
                capsys, "ade20k", task, setting, ade_root / "annotations" / "training")


@pytest.mark.camvid
def test_camvid_train_and_val(tmp_path, capsys):
    root = camvid_root()
    for split, n in (("train", 367), ("val", 101)):
        out = tmp_path / split
        code, _, err = run(capsys, shards_cli, ["build", "--dataset", "camvid", "--root",
                                                str(root), "--split", split, "--out", str(out),
                                                "--shard-size", "8MB"])
        assert code == 0, err
        assert len(load_manifest(out).samples) == n
        code, stdout, _ = run(capsys, shards_cli, ["verify", str(out), "--decode"])
        assert code == 0 and f"{n} samples" in stdout
        for task in ("6-5", "6-1"):
            for setting in ("overlap", "disjoint"):
                assert manifest_counts(capsys, out, "camvid", task, setting) == label_counts(
                    capsys, "camvid", task, setting, root / f"{split}annot",
                    root / f"{split}.txt")


def test_jpeg_bytes_kept_and_labels_are_css_ids(voc_root, tmp_path):
    out = tmp_path / "s"
    samples = list_samples("voc", voc_root, "train_aug")
    manifest = build_shards(samples, get_dataset("voc"), out, "train_aug", progress=False)
    rec = manifest.samples[0]
    with open(out / rec.shard, "rb") as f:
        f.seek(rec.image[0])
        jpg = f.read(rec.image[1])
    assert jpg == (voc_root / "JPEGImages" / f"{rec.key}.jpg").read_bytes()
    with tarfile.open(out / rec.shard) as tar:  # a standard tar webdataset can read
        names = tar.getnames()
    assert f"{rec.key}.jpg" in names and f"{rec.key}.png" in names


def test_resume_skips_finished_shards(voc_root, tmp_path):
    out = tmp_path / "s"
    samples = list_samples("voc", voc_root, "train_aug")
    build_shards(samples, get_dataset("voc"), out, "train_aug", shard_size="5KB",
                 progress=False)
    first = sorted(out.glob("shard-*.tar"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in first}
    first[0].unlink()  # an interrupted build: one shard missing
    logs = []
    build_shards(samples, get_dataset("voc"), out, "train_aug", shard_size="5KB",
                 progress=False, log=logs.append)
    assert any("resuming" in m for m in logs)
    for p in sorted(out.glob("shard-*.tar"))[1:]:
        assert p.stat().st_mtime_ns == mtimes[p.name]  # untouched
    assert verify_shards(out, progress=False).ok
    assert not list(out.glob("*.tmp"))


def test_plan_is_deterministic_and_shuffled(voc_root):
    samples = list_samples("voc", voc_root, "train_aug")
    a = [[s.key for s in g] for g in plan_shards(samples, 10**9, seed=1)]
    b = [[s.key for s in g] for g in plan_shards(samples, 10**9, seed=1)]
    c = [[s.key for s in g] for g in plan_shards(samples, 10**9, seed=2)]
    assert a == b and a != c and sorted(a[0]) == sorted(VOC_SAMPLES)
    assert parse_size("1GB") == 10**9 and parse_size("64MiB") == 64 * 2**20
    with pytest.raises(ValueError, match="bad size"):
        parse_size("lots")


def test_step_index_lists_only_selected_samples(voc_root, tmp_path):
    out = tmp_path / "s"
    samples = list_samples("voc", voc_root, "train_aug")
    manifest = build_shards(samples, get_dataset("voc"), out, "train_aug", shard_size="5KB",
                            progress=False)
    task = get_task("voc", "15-1")
    keys = selected_keys(manifest, task, 1)
    assert sorted(keys) == ["2007_000002", "2007_000004"]
    tars, idx = write_step_index(manifest, out, keys, tmp_path / "idx")
    listed = []
    for path in idx:
        lines = Path(path).read_text().splitlines()
        assert lines[0] == f"v1.2 {len(lines) - 1}"
        listed += [line.split()[3].removesuffix(".jpg") for line in lines[1:]]
    assert sorted(listed) == sorted(keys)
    assert len(tars) == len(idx) <= len(manifest.shards)


def test_inspect_histogram(voc_root, tmp_path):
    out = tmp_path / "s"
    build_shards(list_samples("voc", voc_root, "train_aug"), get_dataset("voc"), out,
                 "train_aug", progress=False)
    info = inspect_shards(out)
    assert info["num_samples"] == 6
    assert info["class_histogram"]["background"] == 5
    assert info["class_histogram"]["train"] == 1  # class 19


def test_synth_command_makes_a_learnable_dataset(tmp_path, capsys):
    out = tmp_path / "synth"
    code, _, err = run(capsys, shards_cli, ["synth", "--out", str(out), "--num", "12",
                                            "--classes", "4", "--size", "40x56"])
    assert code == 0, err
    manifest = load_manifest(out)
    assert len(manifest.samples) == 12 and manifest.class_names[0] == "background"
    assert all(s.height == 40 and s.width == 56 for s in manifest.samples)
    assert verify_shards(out, decode=True, progress=False).ok
    assert not (out / "raw").exists()
    code, stdout, _ = run(capsys, shards_cli, ["inspect", str(out), "--task", "2-1"])
    assert code == 0 and "step 1" in stdout

"""Every kind of bad input gets a message naming the shard and the sample; the builder and
verify report them; the pipeline fails fast or skips and counts, as configured."""

import json

import numpy as np
import pytest

from icd_dist import shards as shards_cli
from icd_dist.css import get_dataset
from icd_dist.data.errors import BadSampleError
from icd_dist.data.manifest import load_manifest
from icd_dist.data.readers import list_samples
from icd_dist.data.shard_writer import BuildError, build_shards
from icd_dist.data.torch_pipeline import AugmentConfig, ShardDataset, make_loader
from icd_dist.data.verify import verify_shards
from tests.conftest import block_label, image_for, write_jpeg, write_label

RAW = AugmentConfig(train=False, eval_size=None)


@pytest.fixture
def shards(voc_root, tmp_path):
    out = tmp_path / "voc"
    build_shards(list_samples("voc", voc_root, "train_aug"), get_dataset("voc"), out,
                 "train_aug", progress=False)
    return out


def patch(folder, record_field, key, data_at=0, payload=b"\x00\x00\x00\x00"):
    """Overwrite bytes of one member of one sample in its shard (same length)."""
    manifest = load_manifest(folder)
    rec = next(s for s in manifest.samples if s.key == key)
    offset = getattr(rec, record_field)[0] + data_at
    with open(folder / rec.shard, "r+b") as f:
        f.seek(offset)
        f.write(payload)
    return rec


def read_all(folder, bad_samples):
    ds = ShardDataset(folder, None, None, RAW, bad_samples=bad_samples)
    batches = list(make_loader(ds, 2, num_workers=0))
    return sum(b.images.shape[0] for b in batches), sum(b.skipped for b in batches)


def assert_fail_and_skip(folder, key, fragment):
    with pytest.raises(BadSampleError) as err:
        read_all(folder, "fail")
    assert key in str(err.value) and "shard-000000.tar" in str(err.value)
    assert fragment in str(err.value)
    good, skipped = read_all(folder, "skip")
    assert (good, skipped) == (5, 1)


def test_corrupt_jpeg(shards):
    rec = patch(shards, "image", "2007_000003")
    assert_fail_and_skip(shards, "2007_000003", "corrupt image")
    report = verify_shards(shards, decode=True, progress=False)
    assert any("sha256 mismatch" in p for p in report.problems)
    assert any(rec.key in p and "corrupt image" in p for p in report.problems)


def test_corrupt_png(shards):
    patch(shards, "label", "2007_000004", data_at=0, payload=b"GARBAGE!")
    assert_fail_and_skip(shards, "2007_000004", "corrupt label")


def test_label_ids_out_of_range_in_a_shard(shards):
    # a manifest claiming fewer classes than the labels hold (e.g. shards of another dataset)
    path = shards / "manifest.json"
    data = json.loads(path.read_text())
    data["class_names"] = data["class_names"][:17]
    path.write_text(json.dumps(data))
    with pytest.raises(BadSampleError, match=r"label ids \[19\] outside 0..16"):
        ds = ShardDataset(shards, ["2008_000006"], None, RAW)
        ds[0]
    report = verify_shards(shards, decode=True, progress=False)
    assert any("2007_000005" in p and "[20]" in p for p in report.problems)


def test_truncated_shard(shards):
    manifest = load_manifest(shards)
    tar = shards / manifest.shards[0].name
    last = max(manifest.samples, key=lambda s: s.label[0])
    with open(tar, "r+b") as f:
        f.truncate(last.label[0] + 10)  # cut inside the last label
    assert_fail_and_skip(shards, last.key, "truncated")
    report = verify_shards(shards, progress=False)
    assert any("truncated or replaced" in p for p in report.problems)


def test_checksum_mismatch_reported_by_verify_command(shards, capsys):
    manifest = load_manifest(shards)
    tar = shards / manifest.shards[0].name
    data = bytearray(tar.read_bytes())
    data[-100] ^= 0xFF  # in the tar's zero padding: samples still read fine
    tar.write_bytes(bytes(data))
    assert shards_cli.main(["verify", str(shards)]) == 1
    out = capsys.readouterr().out
    assert "shard-000000.tar: sha256 mismatch" in out and "1 problems" in out


def test_missing_shard_file(shards):
    (shards / "shard-000000.tar").unlink()
    with pytest.raises(BadSampleError, match="shard file is missing"):
        read_all(shards, "fail")
    assert not verify_shards(shards, progress=False).ok


def _add_raw(voc_root, key, image, label, listed=True):
    write_jpeg(voc_root / "JPEGImages" / f"{key}.jpg", image)
    if label is not None:
        write_label(voc_root / "SegmentationClassAug" / f"{key}.png", label, palette=True)
    lst = voc_root / "ImageSets" / "Segmentation" / "train_aug.txt"
    if listed:
        lst.write_text(lst.read_text() + f"{key}\n")


@pytest.mark.parametrize(("key", "make", "fragment"), [
    ("bad_ids", lambda: (image_for(block_label([0, 42])), block_label([0, 42])),
     "label ids [42] are not valid"),
    ("bad_size", lambda: (image_for(block_label([0, 1], 40, 40)), block_label([0, 1])),
     "image is 40x40 but label is 64x48"),
    ("no_label", lambda: (image_for(block_label([0, 1])), None), "missing label file"),
])
def test_builder_names_bad_raw_samples(voc_root, tmp_path, key, make, fragment, capsys):
    image, label = make()
    _add_raw(voc_root, key, image, label)
    out = tmp_path / "shards"
    argv = ["build", "--dataset", "voc", "--root", str(voc_root), "--split", "train_aug",
            "--out", str(out)]
    assert shards_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert key in err and fragment in err and "--skip-bad" in err
    assert not (out / "manifest.json").exists()
    with pytest.raises(BuildError):
        build_shards(list_samples("voc", voc_root, "train_aug"), get_dataset("voc"), out,
                     "train_aug", progress=False)
    assert shards_cli.main(argv + ["--skip-bad"]) == 0
    manifest = load_manifest(out)
    assert len(manifest.samples) == 6
    assert [r["key"] for r in manifest.rejected] == [key]
    assert "left out 1 bad samples" in capsys.readouterr().out


def test_corrupt_raw_image_is_named(voc_root, tmp_path):
    _add_raw(voc_root, "broken", np.zeros((48, 64, 3), np.uint8), block_label([0, 1]))
    (voc_root / "JPEGImages" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(BuildError, match="broken: cannot read image"):
        build_shards(list_samples("voc", voc_root, "train_aug"), get_dataset("voc"),
                     tmp_path / "s", "train_aug", progress=False)


def test_bad_sample_error_survives_pickling():
    import pickle

    err = BadSampleError("corrupt image", "k1", "shard-000001.tar")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.key, back.shard, str(back)) == (err.reason, err.key, err.shard,
                                                              str(err))

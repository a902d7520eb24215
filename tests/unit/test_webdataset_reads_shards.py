"""Our shards are WebDataset tars: `webdataset.WebDataset`, as a user's own tooling would read
them, finds every sample of the manifest by its key, with the image's JPEG bytes and the
label's CSS ids exactly as our reader gets them. Labels are decoded with "l8": webdataset's
usual "pil"/"rgb8" would turn the single-channel PNG of ids into RGB."""

import pytest
import torch

from icd_dist.data.manifest import load_manifest
from icd_dist.data.sample_io import decode_sample, read_member
from icd_dist.data.shard_files import ShardFile
from icd_dist.data.synthetic import build_synthetic


def test_webdataset_reads_our_shards_keys_images_and_labels(tmp_path):
    wds = pytest.importorskip("webdataset")
    folder = tmp_path / "train"
    # several shards, odd image sizes
    build_synthetic(folder, 14, 5, (37, 53), seed=3, shard_size="8KB", progress=False)
    manifest = load_manifest(folder)
    tars = sorted(str(p) for p in folder.glob("shard-*.tar"))
    assert len(tars) >= 2
    dataset = wds.WebDataset(tars, shardshuffle=False, empty_check=True).decode(
        wds.imagehandler("l8", ["png"]))  # the JPEG stays bytes, compared as stored
    read = {s["__key__"]: s for s in dataset}
    assert set(read) == {r.key for r in manifest.samples}
    for record in manifest.samples:
        with ShardFile(folder / record.shard) as f:
            jpg = read_member(f, *record.image, record.shard, record.key, "image")
            png = read_member(f, *record.label, record.shard, record.key, "label")
        image, label = decode_sample(jpg, png, record, num_classes=5)
        sample = read[record.key]
        assert sample["jpg"] == jpg
        assert sample["png"].dtype.name == "uint8" and sample["png"].ndim == 2
        assert torch.equal(torch.tensor(sample["png"]), label)
        assert tuple(image.shape[1:]) == sample["png"].shape == (37, 53)
        assert set(label.unique().tolist()) <= set(range(5)) | {255}

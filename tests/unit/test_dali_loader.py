"""The DALI loader's pipeline and label table across epochs (CPU operators): one pipeline per
loader, every epoch's augmentation a pure function of (seed, epoch, position) whatever ran
before it (an epoch read in part leaks nothing into the next), EXIF orientation ignored as in
the torch pipeline, and the step's label table applied on the labels' device from a tensor
built once, mapping as the checked `apply_lut` does."""

import numpy as np
import pytest
import torch
from PIL import Image

from icd_dist.css import apply_lut, eval_lut, get_task, train_lut
from icd_dist.css.classes import generic_spec
from icd_dist.css.remap import INVALID, DeviceLut
from icd_dist.data import dali_pipeline
from icd_dist.data.dali_pipeline import DaliLoader, DaliOptions
from icd_dist.data.manifest import load_manifest
from icd_dist.data.readers import RawSample
from icd_dist.data.shard_writer import build_shards
from icd_dist.data.torch_pipeline import AugmentConfig, ShardDataset, make_loader
from tests.conftest import write_jpeg, write_label

NUM = 11  # 6 batches of 2, the last partial


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali_loader")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(NUM):
        h, w = 40 + 3 * i, 56
        write_jpeg(root / "raw" / f"s{i:02d}.jpg",
                   rng.integers(0, 255, size=(h, w, 3)).astype(np.uint8))
        write_label(root / "raw" / f"s{i:02d}.png",
                    rng.integers(0, 4, size=(h, w)).astype(np.uint8))
        samples.append(RawSample(f"s{i:02d}", root / "raw" / f"s{i:02d}.jpg",
                                 root / "raw" / f"s{i:02d}.png"))
    build_shards(samples, generic_spec("pairs", 4), root / "shards", "train",
                 shard_size="20KB", progress=False)
    return root / "shards"


def dali_loader(shards, batch_size=2, train=True, lut=None, seed=3, **kw):
    """A one-rank DALI loader over every sample of `shards` (training crops 24 x 24)."""
    options = DaliOptions(batch_size=batch_size, train=train, crop_size=24, eval_size=None,
                          seed=seed, **kw)
    return DaliLoader(str(shards), load_manifest(shards).samples, options, lut)


def epoch(loader, number, stop_after=None):
    """The batches of `number` (images, labels, keys); stop_after: break after that many."""
    loader.set_epoch(number)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == stop_after:
            break
    return out


def same(a, b):
    """Whether two epochs' batches are identical (keys, images, labels)."""
    return len(a) == len(b) and all(
        x[2] == y[2] and torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
        for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("crop_mode", ["inside", "padded"])
def test_one_pipeline_and_epochs_that_do_not_depend_on_earlier_ones(shards, monkeypatch,
                                                                    crop_mode):
    built = []
    build = dali_pipeline._build_pipeline
    monkeypatch.setattr(dali_pipeline, "_build_pipeline",
                        lambda *a: built.append(1) or build(*a))
    long_run = dali_loader(shards, crop_mode=crop_mode)
    first = epoch(long_run, 0)
    assert [len(b[2]) for b in first] == [2, 2, 2, 2, 2, 1]  # the last batch partial
    assert [k for b in first for k in b[2]] == \
        [long_run.records[i].key for i, _ in long_run.plan()]
    epoch(long_run, 1, stop_after=1)  # the iteration budget ends an epoch early...
    assert len(epoch(long_run, 2, stop_after=6)) == 6  # ...or right at its last batch
    third = epoch(long_run, 3)  # ...and no batch of those epochs comes out here
    epoch(long_run, 4, stop_after=1)
    again = epoch(long_run, 0)
    assert len(built) == 1  # one pipeline for all those epochs
    # a resumed run (a fresh loader) reads what the uninterrupted one read
    assert same(epoch(dali_loader(shards, crop_mode=crop_mode), 3), third)
    assert same(again, first)
    assert not torch.equal(first[0][0], third[0][0])
    # each sample's augmentation comes from its position, not from its batch
    by_three = epoch(dali_loader(shards, batch_size=3, crop_mode=crop_mode), 3)
    assert torch.equal(torch.cat([b[0] for b in by_three]), torch.cat([b[0] for b in third]))


def test_evaluation_reuses_its_pipeline_and_ranks_without_samples_yield_nothing(shards,
                                                                               monkeypatch):
    built = []
    build = dali_pipeline._build_pipeline
    monkeypatch.setattr(dali_pipeline, "_build_pipeline",
                        lambda *a: built.append(1) or build(*a))
    records = load_manifest(shards).samples[:2]
    options = DaliOptions(batch_size=2, train=False, eval_size=16)
    loaders = [DaliLoader(str(shards), records, options, None, rank, 4) for rank in range(4)]
    for _ in range(2):
        keys = [[k for b in ld for k in b[2]] for ld in loaders]
        assert keys == [[records[0].key], [records[1].key], [], []]
    assert len(built) == 2  # one per rank that has samples, reused by the second pass


def exif_jpeg(path, rgb, orientation=6):
    """A JPEG of `rgb` (stored as is) tagged with an EXIF orientation (6: rotate 90 CW)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_is_ignored_as_by_the_torch_pipeline(tmp_path):
    h, w = 24, 40
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:, : w // 2] = (200, 30, 30)  # left half red, right half blue
    rgb[:, w // 2:] = (30, 30, 200)
    lab = np.zeros((h, w), np.uint8)
    lab[:, w // 2:] = 1
    exif_jpeg(tmp_path / "raw" / "r.jpg", rgb)
    with Image.open(tmp_path / "raw" / "r.jpg") as img:
        assert img.getexif()[0x0112] == 6
    write_label(tmp_path / "raw" / "r.png", lab)
    build_shards([RawSample("r", tmp_path / "raw" / "r.jpg", tmp_path / "raw" / "r.png")],
                 generic_spec("pairs", 2), tmp_path / "shards", "train", progress=False)
    records = load_manifest(tmp_path / "shards").samples
    for eval_size in (None, 16):  # the decoder's shape; the peeked shape the resize uses
        options = DaliOptions(batch_size=1, train=False, eval_size=eval_size)
        (d_img, d_lab, _), = DaliLoader(str(tmp_path / "shards"), records, options, None)
        ds = ShardDataset(tmp_path / "shards", None, None,
                          AugmentConfig(train=False, eval_size=eval_size))
        t = next(iter(make_loader(ds, 1, num_workers=0)))
        size = (h, w) if eval_size is None else (16, 16)
        assert d_img.shape == t.images.shape == (1, 3, *size)
        assert torch.equal(d_lab, t.labels)
        assert (d_img - t.images).abs().max().item() < 0.1  # a JPEG level or two apart
        red = d_img[0, 0] > d_img[0, 2]
        assert torch.equal(red, d_lab[0] == 0)  # the image's halves lie on the label's


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_device_lut_maps_as_the_checked_lut(device):
    rng = np.random.default_rng(0)
    task = get_task("voc", "15-1")
    ids = np.r_[0:21, 255]  # the dataset's ids
    for lut in (train_lut(task, 0), train_lut(task, 3), eval_lut(task, 2),
                eval_lut(task, 4, unseen="ignore")):
        labels = torch.from_numpy(rng.choice(ids, size=(3, 17, 29)).astype(np.uint8))
        got = DeviceLut(lut)(labels.to(device))
        assert got.dtype == torch.int64 and got.device.type == device
        assert torch.equal(got.cpu(), apply_lut(lut, labels))
    # unchecked: an id outside the dataset gives INVALID (apply_lut raises)
    odd = torch.tensor([[0, 21, 254, 255]], dtype=torch.uint8, device=device)
    assert DeviceLut(lut)(odd).tolist() == [[0, INVALID, INVALID, 255]]


def test_dali_loader_uploads_its_label_table_once(shards, monkeypatch):
    lut = np.full(256, INVALID, np.int16)
    lut[:4] = [0, 3, 1, 2]
    uploads = []
    as_tensor = torch.as_tensor

    def counting(data, *a, **kw):
        if isinstance(data, np.ndarray) and data.shape == (256,):
            uploads.append(1)
        return as_tensor(data, *a, **kw)

    monkeypatch.setattr(torch, "as_tensor", counting)
    loader = dali_loader(shards, lut=lut)
    batches = epoch(loader, 0) + epoch(loader, 1)
    assert len(batches) == 12 and len(uploads) == 1
    raw = dali_loader(shards)  # the same batches without the table, mapped by apply_lut
    for (_, labels, _), (_, ids, _) in zip(batches, epoch(raw, 0) + epoch(raw, 1), strict=True):
        assert torch.equal(labels, apply_lut(lut, ids))

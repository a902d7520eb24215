"""The DALI (CPU operators) and torch pipelines on the same shards: the same outputs with
augmentation off; aligned image and mask, and only source ids, with augmentation on; the same
training crop rule (each pipeline draws with its own generator: the DALI operators give the box
the torch rule gives for the same uniforms), never padded unless crop_mode is "padded"."""

import numpy as np
import pytest
import torch

from icd_dist.config import load_config
from icd_dist.css import get_dataset, get_task, train_lut
from icd_dist.css.classes import generic_spec
from icd_dist.data.dali_pipeline import DaliLoader, DaliOptions
from icd_dist.data.inspect import selected_keys
from icd_dist.data.manifest import load_manifest
from icd_dist.data.pipeline import StepLoader, resolve_pipeline
from icd_dist.data.readers import RawSample, list_samples
from icd_dist.data.shard_writer import build_shards
from icd_dist.data.torch_pipeline import AugmentConfig, ShardDataset, make_loader
from icd_dist.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import write_jpeg, write_label

CLASS_RED = 40  # aligned-sample image: red channel = 40 * class id


@pytest.fixture
def voc_shards(voc_root, tmp_path):
    out = tmp_path / "voc"
    build_shards(list_samples("voc", voc_root, "train_aug"), get_dataset("voc"), out,
                 "train_aug", shard_size="5KB", progress=False)
    return out


@pytest.fixture
def aligned_shards(tmp_path):
    """Samples whose mask is computable from the image: big blocks of class c have red
    channel 40 * c; green/blue constant."""
    samples = []
    rng = np.random.default_rng(0)
    for i in range(6):
        lab = np.zeros((96, 128), dtype=np.uint8)
        for _ in range(4):
            c = int(rng.integers(1, 6))
            y, x = int(rng.integers(0, 60)), int(rng.integers(0, 90))
            lab[y:y + 36, x:x + 38] = c
        img = np.stack([lab.astype(np.int64) * CLASS_RED, np.full(lab.shape, 60),
                        np.full(lab.shape, 60)], -1).astype(np.uint8)
        key = f"aligned_{i}"
        write_jpeg(tmp_path / "raw" / f"{key}.jpg", img)
        write_label(tmp_path / "raw" / f"{key}.png", lab)
        samples.append(RawSample(key, tmp_path / "raw" / f"{key}.jpg",
                                 tmp_path / "raw" / f"{key}.png"))
    out = tmp_path / "aligned"
    build_shards(samples, generic_spec("pairs", 6), out, "train", progress=False)
    return out


def dali_batches(shard_dir, keys, options, lut=None, rank=0, world=1, epoch=0):
    wanted = set(keys)
    records = [r for r in load_manifest(shard_dir).samples if r.key in wanted]
    loader = DaliLoader(str(shard_dir), records, options, lut, rank, world)
    loader.set_epoch(epoch)
    return list(loader)


def torch_batches(shard_dir, keys, augment, lut=None, epoch=0, rank=0, world=1, seed=0):
    ds = ShardDataset(shard_dir, keys, lut, augment, seed=seed)
    return list(make_loader(ds, 4, rank, world, num_workers=0, epoch=epoch, seed=seed))


def test_augmentation_off_same_outputs(voc_shards):
    keys = [s.key for s in load_manifest(voc_shards).samples]
    lut = train_lut(get_task("voc", "15-1"), 1)
    dali = dali_batches(voc_shards, keys, DaliOptions(batch_size=4, train=False,
                                                      eval_size=None), lut)
    torch_ = torch_batches(voc_shards, keys, AugmentConfig(train=False, eval_size=None), lut)
    d_img = torch.cat([b[0] for b in dali])
    d_lab = torch.cat([b[1] for b in dali])
    t_img = torch.cat([b.images for b in torch_])
    t_lab = torch.cat([b.labels for b in torch_])
    assert d_lab.dtype == t_lab.dtype == torch.int64
    assert torch.equal(d_lab, t_lab)  # identical labels, the step's remapping applied
    assert set(t_lab.unique().tolist()) <= {0, 16, 255}
    # JPEG decoders may differ by a grey level or two (1/0.225/255 per level after norm)
    assert (d_img - t_img).abs().max().item() < 3 / (0.225 * 255)
    assert d_img.shape == t_img.shape == (6, 3, 48, 64)


def test_eval_transform_same_geometry(voc_shards):
    keys = [s.key for s in load_manifest(voc_shards).samples]
    dali = dali_batches(voc_shards, keys, DaliOptions(batch_size=6, train=False, eval_size=32))
    torch_ = torch_batches(voc_shards, keys, AugmentConfig(train=False, eval_size=32))
    d_lab, t_lab = dali[0][1], torch.cat([b.labels for b in torch_])
    assert d_lab.shape == t_lab.shape == (6, 32, 32)
    # same crop and nearest-neighbour rule; ties at exact pixel-centre halves may round apart
    assert (d_lab == t_lab).float().mean().item() > 0.97


def _check_aligned(images, labels, source_ids):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    for img, lab in zip(images, labels, strict=True):
        assert set(lab.unique().tolist()) <= source_ids | {255}
        red = (img * std + mean)[0]
        inside = lab != 255
        # pixels well inside a block: 3x3 neighbourhood of one class
        lab_f = lab.float()[None, None]
        pooled_max = torch.nn.functional.max_pool2d(lab_f, 3, 1, 1)[0, 0]
        pooled_min = -torch.nn.functional.max_pool2d(-lab_f, 3, 1, 1)[0, 0]
        interior = inside & (pooled_max == pooled_min)
        predicted = torch.round(red / CLASS_RED)
        agree = (predicted[interior] == lab[interior].float()).float().mean().item()
        assert agree > 0.98, agree
        # padding: black image under ignored mask (away from its edge, where the linear
        # resize of the image blends in the neighbouring image pixels)
        pad = (lab == 255).float()[None, None]
        padded = -torch.nn.functional.max_pool2d(-pad, 3, 1, 1)[0, 0] > 0
        if padded.any():
            assert red[padded].abs().max().item() < 20


@pytest.mark.parametrize("crop_mode", ["inside", "padded"])
@pytest.mark.parametrize("pipeline", ["torch", "dali"])
def test_augmentation_on_keeps_image_and_mask_aligned(aligned_shards, pipeline, crop_mode):
    manifest = load_manifest(aligned_shards)
    keys = [s.key for s in manifest.samples]
    source_ids = set().union(*[set(s.classes) for s in manifest.samples])
    padded = 0
    for seed in (0, 1, 2):
        if pipeline == "torch":
            batches = torch_batches(aligned_shards, keys, AugmentConfig(
                train=True, crop_size=64, scale=(0.5, 2.0), crop_mode=crop_mode), seed=seed)
            images = torch.cat([b.images for b in batches])
            labels = torch.cat([b.labels for b in batches])
        else:
            batches = dali_batches(aligned_shards, keys, DaliOptions(
                batch_size=3, train=True, crop_size=64, seed=seed + 1,
                crop_mode=crop_mode))
            images = torch.cat([b[0] for b in batches])
            labels = torch.cat([b[1] for b in batches])
        assert images.shape == (6, 3, 64, 64)
        _check_aligned(images, labels, source_ids)
        padded += int((labels == 255).sum())
    if crop_mode == "inside":  # the source masks have no 255: nothing was padded
        assert padded == 0
    else:  # a box larger than the image (s > 1 half of the time) is padded with 255
        assert padded > 0


def test_default_train_crop_never_pads(aligned_shards):
    """Both pipelines with their default settings: the crop lies inside the image."""
    keys = [s.key for s in load_manifest(aligned_shards).samples]
    for seed in range(4):
        t = torch_batches(aligned_shards, keys, AugmentConfig(train=True, crop_size=48),
                          seed=seed)
        d = dali_batches(aligned_shards, keys, DaliOptions(batch_size=6, train=True,
                                                           crop_size=48, seed=seed + 1))
        labels = torch.cat([b.labels for b in t] + [b[1] for b in d])
        assert labels.shape == (12, 48, 48)
        assert labels.max().item() < 255


def test_dali_crop_box_is_the_torch_rule():
    """The DALI operators' box (inside_crop_box) equals transforms.crop_box_from_uniforms, the
    rule sample_crop_params applies, for the same uniforms: thousands of random uniforms on
    odd, elongated and tiny images, plus exact rounding ties (scale 1/4, aspect 1)."""
    from nvidia.dali import fn, pipeline_def, types

    from icd_dist.data.dali_pipeline import inside_crop_box
    from icd_dist.data.transforms import crop_box_from_uniforms

    rng = np.random.default_rng(0)
    shapes = [(512, 512), (37, 300), (300, 37), (1, 1), (375, 500), (500, 375), (7, 13),
              (1, 2), (2, 1), (101, 120), (100, 200)]
    shapes += [tuple(int(v) for v in rng.integers(1, 700, 2)) for _ in range(53)]
    n = 1024
    cases = [(np.array(shapes[i % len(shapes)], np.float64), rng.random(10), rng.random(10),
              np.float64(rng.random()), np.float64(rng.random())) for i in range(n)]
    ties = [(np.array([k, k], np.float64), np.zeros(10), rng.random(10),
             np.float64(u), np.float64(1 - u)) for k in (5, 7, 9, 11) for u in (0.0, 0.5, 0.99)]

    def run(batch, scale, ratio):
        @pipeline_def(batch_size=len(batch), num_threads=1, device_id=None, seed=0,
                      exec_dynamic=True)
        def boxes():
            hw, us, ur, ut, ul = fn.external_source(
                source=lambda: [[c[i] for c in batch] for i in range(5)], num_outputs=5,
                batch=True, dtype=types.FLOAT64)
            return inside_crop_box(hw[0], hw[1], us, ur, ut, ul, scale, ratio)

        pipe = boxes()
        pipe.build()
        out = pipe.run()
        got = [tuple(int(np.array(o[i])) for o in out) for i in range(len(batch))]
        want = [crop_box_from_uniforms(int(c[0][0]), int(c[0][1]), c[1], c[2], float(c[3]),
                                       float(c[4]), scale, ratio) for c in batch]
        return got, want

    got, want = run(cases, (0.5, 2.0), (3 / 4, 4 / 3))
    assert got == want
    fallbacks = sum(b == crop_box_from_uniforms(int(c[0][0]), int(c[0][1]), [0.99] * 10,
                                                [0.5] * 10, 0, 0)
                    for b, c in zip(want, cases, strict=True))
    assert 50 < fallbacks < n - 50, fallbacks  # both branches exercised
    got, want = run(ties, (0.25, 0.25), (1.0, 1.0))
    assert got == want
    # sqrt(k^2 / 4) = k / 2 rounds half to even: 5 -> 2, 7 -> 4, 9 -> 4, 11 -> 6
    assert sorted({b[2] for b in want}) == [2, 4, 6]


def test_step_loader_passes_the_crop_mode(aligned_shards):
    keys = [s.key for s in load_manifest(aligned_shards).samples]
    for kind in ("torch", "dali"):
        found = {}
        for mode in ("inside", "padded"):
            data = load_config(None, ["data.crop_size=32", f"data.pipeline={kind}",
                                      "data.loader_workers=0", f"data.crop_mode={mode}"]).data
            assert data.crop_mode == mode
            labels = []
            for seed in range(3):
                loader = StepLoader(data, aligned_shards, keys, None, train=True, batch_size=3,
                                    seed=seed)
                labels += [b.labels for b in loader]
            found[mode] = bool((torch.cat(labels) == 255).any())
        assert found == {"inside": False, "padded": True}
    with pytest.raises(Exception, match="data.crop_mode"):
        load_config(None, ["data.crop_mode=reflect"])


def test_torch_pipeline_epochs_ranks_and_determinism(aligned_shards):
    keys = [s.key for s in load_manifest(aligned_shards).samples]
    aug = AugmentConfig(train=True, crop_size=32)
    a = torch_batches(aligned_shards, keys, aug, epoch=0, seed=5)
    b = torch_batches(aligned_shards, keys, aug, epoch=0, seed=5)
    c = torch_batches(aligned_shards, keys, aug, epoch=1, seed=5)
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0].images, c[0].images)
    # two ranks see disjoint halves of the epoch
    ds = ShardDataset(aligned_shards, keys, None, AugmentConfig(train=False, eval_size=None))
    seen = []
    for rank in (0, 1):
        sampler = make_loader(ds, 2, rank, 2, num_workers=0, shuffle=True).sampler
        seen.append([index for index, _ in sampler])
    assert sorted(seen[0] + seen[1]) == list(range(6))
    # evaluation split: every sample exactly once, no padding
    ev = [list(make_loader(ds, 2, r, 4, num_workers=0).sampler) for r in range(4)]
    assert sorted(i for part in ev for i in part) == list(range(6))


def test_dali_shards_by_rank(aligned_shards):
    keys = [s.key for s in load_manifest(aligned_shards).samples]
    counts = []
    for rank in (0, 1):
        batches = dali_batches(aligned_shards, keys, DaliOptions(batch_size=2, train=False,
                                                                 eval_size=None),
                               rank=rank, world=2)
        counts.append(sum(b[0].shape[0] for b in batches))
    assert sum(counts) == 6 and counts[0] == counts[1]


def test_torch_loader_workers_give_same_batches(aligned_shards):
    keys = [s.key for s in load_manifest(aligned_shards).samples]
    ds = ShardDataset(aligned_shards, keys, None, AugmentConfig(train=True, crop_size=32),
                      seed=3)
    one = [b.images for b in make_loader(ds, 3, num_workers=0, epoch=2, seed=3)]
    two = [b.images for b in make_loader(ds, 3, num_workers=2, epoch=2, seed=3)]
    assert all(torch.equal(x, y) for x, y in zip(one, two, strict=True))


def test_loader_workers_are_spawned_once_a_dali_pipeline_ran(aligned_shards, monkeypatch):
    """Loader workers are forked until a DALI pipeline runs in the process, spawned after it,
    and read the same batches: forked after DALI's threads, they segfaulted or hung (about
    every second run of test_torch_loader_workers_give_same_batches after
    test_dali_shards_by_rank under pytest)."""
    from icd_dist.data import fork_safety

    monkeypatch.setattr(fork_safety, "_reasons", set())  # as if no DALI pipeline ran yet
    keys = [s.key for s in load_manifest(aligned_shards).samples]
    ds = ShardDataset(aligned_shards, keys, None, AugmentConfig(train=True, crop_size=32),
                      seed=3)
    assert make_loader(ds, 3, num_workers=2).loader.multiprocessing_context is None  # fork
    dali_batches(aligned_shards, keys, DaliOptions(batch_size=2, train=False, eval_size=None))
    spawned = make_loader(ds, 3, num_workers=2, epoch=2, seed=3)
    assert spawned.loader.multiprocessing_context.get_start_method() == "spawn"
    one = [b.images for b in make_loader(ds, 3, num_workers=0, epoch=2, seed=3)]
    assert all(torch.equal(x, b.images) for x, b in zip(one, spawned, strict=True))


def test_step_loader_and_pipeline_choice(voc_shards):
    cfg = load_config(None, ["data.crop_size=32", "data.pipeline=auto"])
    assert resolve_pipeline(cfg.data, on_gpu=False) == "torch"
    assert resolve_pipeline(cfg.data, on_gpu=True) == "dali"
    skip = load_config(None, ["data.bad_samples=skip"]).data
    assert resolve_pipeline(skip, on_gpu=True) == "torch"
    with pytest.raises(Exception, match="data.pipeline"):
        resolve_pipeline(load_config(None, ["data.bad_samples=skip", "data.pipeline=dali"])
                         .data, on_gpu=False)
    task = get_task("voc", "15-1")
    keys = selected_keys(load_manifest(voc_shards), task, 0)
    for kind in ("torch", "dali"):
        data = load_config(None, ["data.crop_size=32", f"data.pipeline={kind}",
                                  "data.loader_workers=0"]).data
        loader = StepLoader(data, voc_shards, keys, train_lut(task, 0), train=True,
                            batch_size=2)
        assert loader.kind == kind
        batches = list(loader)
        assert sum(b.images.shape[0] for b in batches) == len(keys)
        assert all(b.labels.max() <= 255 for b in batches)

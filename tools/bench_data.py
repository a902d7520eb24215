"""Input-pipeline throughput on this machine's CPU: DALI (CPU operators), the torch pipeline,
and a plain baseline (PIL decode + torchvision transforms in a DataLoader), on the same
cores, with the protocol's training augmentation (random resized crop + flip) at crop 512.
With `--dali-device gpu`, DALI decodes and augments on GPU 0 instead (the training path on GPU
workers), and every pipeline's batches are timed up to their arrival on that GPU.

Two inputs: CamVid-sized JPEGs (480x360; the real CamVid images when ../shared/data/camvid
exists) and 512x512 JPEGs (synthetic). Prints a table and writes JSON.

    python tools/bench_data.py [--images 256] [--workers 2] [--dali-device cpu|gpu]
                               [--out bench_data.json]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import cpu_name  # noqa: E402

from icd_dist.css.classes import generic_spec, get_dataset  # noqa: E402
from icd_dist.data.dali_pipeline import DaliLoader, DaliOptions  # noqa: E402
from icd_dist.data.manifest import load_manifest  # noqa: E402
from icd_dist.data.readers import RawSample, list_samples  # noqa: E402
from icd_dist.data.shard_writer import build_shards  # noqa: E402
from icd_dist.data.synthetic import render_sample  # noqa: E402
from icd_dist.data.torch_pipeline import AugmentConfig, ShardDataset, make_loader  # noqa: E402

CAMVID = ROOT.parent / "shared" / "data" / "camvid"


def make_raw(folder: Path, num: int, height: int, width: int) -> list[RawSample]:
    """Synthetic JPEG/PNG pairs of the given size."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(num):
        image, mask = render_sample(np.random.default_rng(i), 12, height, width)
        img_path, lbl_path = folder / f"s{i}.jpg", folder / f"s{i}.png"
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "JPEG", quality=92)
        img_path.write_bytes(buf.getvalue())
        Image.fromarray(mask, mode="L").save(lbl_path)
        samples.append(RawSample(f"s{i}", img_path, lbl_path))
    return samples


class PlainDataset(torch.utils.data.Dataset):
    """The baseline: PIL decode of the raw files + torchvision v2 transforms on image+mask."""

    def __init__(self, samples: list[RawSample], crop: int):
        from torchvision.transforms import v2

        self.samples = samples
        self.transform = v2.Compose([
            v2.RandomResizedCrop(crop, scale=(0.5, 2.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        s = self.samples[i]
        image = tv_tensors.Image(F.pil_to_tensor(Image.open(s.image).convert("RGB")))
        mask = tv_tensors.Mask(F.pil_to_tensor(Image.open(s.label))[0])
        image, mask = self.transform(image, mask)
        image = F.normalize(image.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        return image, mask.long()


def take(batches, limit: int, device: torch.device | None = None) -> float:
    """Images per second while drawing at least `limit` images from an iterator (each batch
    moved to `device` when given, its copies finished before the clock stops)."""
    n, start = 0, time.perf_counter()
    while n < limit:
        b = next(batches)
        images = b[0] if isinstance(b, (tuple, list)) else b.images
        if device is not None:
            labels = b[1] if isinstance(b, (tuple, list)) else b.labels
            images = images.to(device, non_blocking=True)
            labels.to(device, non_blocking=True)
        n += images.shape[0]
    if device is not None:
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - start)


def interleaved(pipelines: dict, images: int, rounds: int,
                device: torch.device | None = None) -> dict[str, float]:
    """Median images/s of each pipeline over `rounds` rounds that alternate between them, so
    that the machine's speed drifting during the run affects all of them alike. Each round
    starts the pipeline afresh (nothing prefetches in the background while another one is
    timed) and times `images / rounds` images after one warm-up batch."""
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(rounds):
        for name, make in pipelines.items():
            it = iter(make())
            next(it)
            rates[name].append(take(it, max(1, images // rounds), device))
            it.close()  # stops the generator, and with it the loader's workers
            del it
    return {name: float(np.median(r)) for name, r in rates.items()}


def bench(name: str, shard_dir: Path, raw: list[RawSample], crop: int, images: int,
          workers: int, batch: int, rounds: int, gpu: bool = False) -> dict:
    """Throughput of the three pipelines on one input set (as many epochs as needed): DALI
    and torch read the shards in `shard_dir`, the baseline the raw files. With `gpu`, DALI
    runs on GPU 0 (key dali_gpu instead of dali_cpu) and every batch is timed onto it."""
    manifest = load_manifest(shard_dir)
    keys = [s.key for s in manifest.samples]

    def torch_epochs():
        ds = ShardDataset(shard_dir, keys, None, AugmentConfig(True, crop))
        for e in itertools.count():
            yield from make_loader(ds, batch, num_workers=workers, epoch=e)

    def dali_epochs():
        loader = DaliLoader(str(shard_dir), manifest.samples,
                            DaliOptions(batch, True, crop, num_threads=workers,
                                        device_id=0 if gpu else None), None)
        for e in itertools.count():
            loader.set_epoch(e)
            yield from ((images, labels) for images, labels, _ in loader)

    def plain_epochs():
        ds = PlainDataset(raw, crop)
        while True:
            yield from torch.utils.data.DataLoader(ds, batch, shuffle=True,
                                                   num_workers=workers)

    dali = "dali_gpu" if gpu else "dali_cpu"
    rates = interleaved({dali: dali_epochs, "torch": torch_epochs, "plain": plain_epochs},
                        images, rounds, torch.device("cuda", 0) if gpu else None)
    first = manifest.samples[0]
    return {"input": name, "size": f"{first.width}x{first.height}", "crop": crop, **rates}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256, help="images timed per pipeline")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="loader processes / DALI threads")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (median taken)")
    p.add_argument("--dali-device", choices=["cpu", "gpu"], default="cpu",
                   help="where DALI decodes and augments (gpu: GPU 0, batches timed onto it)")
    p.add_argument("--out", default="bench_data.json")
    args = p.parse_args()
    gpu = args.dali_device == "gpu"
    if gpu and not torch.cuda.is_available():
        p.error("--dali-device gpu needs a CUDA device")
    torch.set_num_threads(1)
    rows = []
    common = (args.crop, args.images, args.workers, args.batch, args.rounds, gpu)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (CAMVID / "train.txt").is_file():
            raw = list_samples("camvid", CAMVID, "train")
            build_shards(raw, get_dataset("camvid"), tmp / "camvid", "train", progress=False)
            rows.append(bench("camvid", tmp / "camvid", raw, *common))
        else:
            raw = make_raw(tmp / "raw480", 96, 360, 480)
            build_shards(raw, generic_spec("bench", 12), tmp / "s480", "bench", progress=False)
            rows.append(bench("camvid-sized", tmp / "s480", raw, *common))
        raw = make_raw(tmp / "raw512", 96, 512, 512)
        build_shards(raw, generic_spec("bench", 12), tmp / "s512", "bench", progress=False)
        rows.append(bench("512x512", tmp / "s512", raw, *common))
    device = f"CPU: {cpu_name()}, {os.cpu_count()} cores"
    if gpu:
        device = f"GPU: {torch.cuda.get_device_name(0)}; {device}"
    dali = "dali_gpu" if gpu else "dali_cpu"
    env = {"device": device, "dali_device": args.dali_device, "python": sys.version.split()[0],
           "torch": torch.__version__, "dali": _version("nvidia.dali"),
           "torchvision": _version("torchvision"), "workers": args.workers,
           "batch": args.batch, "images_timed": args.images, "rounds": args.rounds}
    print(f"input pipelines, images/s, median of {args.rounds} alternating rounds "
          f"({env['device']}; {args.workers} workers/threads, batch {args.batch}, "
          f"crop {args.crop}, train augmentation)")
    print(f"{'input':<14} {'size':>9} {dali.replace('_', '-').upper():>9} {'torch':>9} "
          f"{'plain':>9} {'torch/DALI':>10} {'torch/plain':>11}")
    for r in rows:
        print(f"{r['input']:<14} {r['size']:>9} {r[dali]:>9.1f} {r['torch']:>9.1f} "
              f"{r['plain']:>9.1f} {r['torch'] / r[dali]:>10.2f} "
              f"{r['torch'] / r['plain']:>11.2f}")
    print(f"torch {env['torch']}, torchvision {env['torchvision']}, DALI {env['dali']}, "
          f"Python {env['python']}")
    Path(args.out).write_text(json.dumps({"env": env, "results": rows}, indent=2))
    print(f"wrote {args.out}")


def _version(module: str) -> str:
    try:
        return __import__(module, fromlist=["__version__"]).__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    main()

"""What building a DALI pipeline costs per epoch, CPU operators (device_id=None): N epochs of
one small loader read by a fresh DaliLoader every epoch (a pipeline built per epoch, as the
loader did before it kept one) and by one DaliLoader (its pipeline built once, each epoch's
order and augmentation fed through the external source), the two interleaved in the same run,
best of R repeats; training and evaluation.

    python tools/bench_dali_build.py [--epochs 20] [--repeats 3] [--out FILE]

Prints a table and writes JSON (default tools/results/bench_dali_build_cpu.json) with the
device and versions. The difference per epoch is the build cost a step no longer pays every
epoch, evaluation and PLOP threshold pass.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_common import cpu_name  # noqa: E402

from icd_dist.css.classes import generic_spec  # noqa: E402
from icd_dist.data.dali_pipeline import DaliLoader, DaliOptions  # noqa: E402
from icd_dist.data.manifest import load_manifest  # noqa: E402
from icd_dist.data.readers import RawSample  # noqa: E402
from icd_dist.data.shard_writer import build_shards  # noqa: E402


def make_shards(root: Path, num: int, height: int, width: int) -> Path:
    """`num` random JPEG/PNG pairs of 4 classes in one shard folder."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "raw").mkdir(parents=True)
    samples = []
    for i in range(num):
        image, label = root / "raw" / f"s{i}.jpg", root / "raw" / f"s{i}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(image)
        Image.fromarray(rng.integers(0, 4, (height, width), dtype=np.uint8)).save(label)
        samples.append(RawSample(f"s{i}", image, label))
    build_shards(samples, generic_spec("pairs", 4), root / "shards", "train", progress=False)
    return root / "shards"


def read_epochs(folder: Path, train: bool, epochs: int, fresh_each_epoch: bool,
                lut: np.ndarray) -> float:
    """Seconds to read `epochs` epochs, with one loader or a new one per epoch."""
    options = DaliOptions(batch_size=4, train=train, crop_size=64, eval_size=64, seed=1)
    records = load_manifest(folder).samples
    loader = None
    started = time.perf_counter()
    for epoch in range(epochs):
        if loader is None or fresh_each_epoch:
            loader = DaliLoader(str(folder), records, options, lut)
        loader.set_epoch(epoch)
        for _ in loader:
            pass
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "tools" / "results"
                   / "bench_dali_build_cpu.json")
    args = p.parse_args(argv)
    import nvidia.dali
    import torch

    lut = np.full(256, -1, np.int16)
    lut[:4] = [0, 1, 2, 3]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_shards(Path(tmp), args.samples, 180, 240)
        for train in (True, False):
            best = {"per_epoch": float("inf"), "once": float("inf")}
            for _ in range(args.repeats):
                for kind in best:  # interleaved: the machine's load hits both alike
                    seconds = read_epochs(folder, train, args.epochs, kind == "per_epoch", lut)
                    best[kind] = min(best[kind], seconds)
            rows.append({"mode": "train" if train else "eval", "epochs": args.epochs,
                         "built_per_epoch_s": best["per_epoch"], "built_once_s": best["once"],
                         "ratio": best["per_epoch"] / best["once"],
                         "build_ms_per_epoch": (best["per_epoch"] - best["once"])
                         / args.epochs * 1e3})
    device = f"CPU: {cpu_name()}, {os.cpu_count()} cores, DALI CPU operators"
    print(f"{device}; DALI {nvidia.dali.__version__}, torch {torch.__version__}; "
          f"{args.samples} samples 240x180, batch 4, crop 64, best of {args.repeats}")
    print(f"{'mode':6} {'epochs':>6} {'built per epoch s':>18} {'built once s':>13} "
          f"{'ratio':>6} {'build ms/epoch':>15}")
    for r in rows:
        print(f"{r['mode']:6} {r['epochs']:6d} {r['built_per_epoch_s']:18.3f} "
              f"{r['built_once_s']:13.3f} {r['ratio']:6.2f} {r['build_ms_per_epoch']:15.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python tools/bench_dali_build.py " + " ".join(argv or sys.argv[1:]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device, "versions": {"dali": nvidia.dali.__version__,
                                       "torch": torch.__version__},
        "samples": args.samples, "repeats": args.repeats, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

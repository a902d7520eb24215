"""`python -m icd_dist.shards`: build, verify and inspect WebDataset shards with a class
manifest, and make the synthetic demo dataset.

    python -m icd_dist.shards build --dataset camvid --root ../shared/data/camvid --split train \\
        --out data/camvid/train
    python -m icd_dist.shards verify data/camvid/train --decode
    python -m icd_dist.shards inspect data/camvid/train --task 6-1 --setting overlap
    python -m icd_dist.shards synth --out data/synth --num 200 --classes 6 --size 96x128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from icd_dist.config import ConfigError
from icd_dist.css.classes import DATASETS as CSS_DATASETS
from icd_dist.css.classes import format_class_ids, generic_spec
from icd_dist.css.tasks import SETTINGS, get_task
from icd_dist.data.inspect import inspect_shards, manifest_spec
from icd_dist.data.manifest import load_manifest
from icd_dist.data.readers import DATASETS, list_samples
from icd_dist.data.shard_writer import BuildError, build_shards
from icd_dist.data.synthetic import build_synthetic


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 96x128, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m icd_dist.shards", description=__doc__.split(
        "\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build shards + manifest from a raw dataset")
    b.add_argument("--dataset", required=True, choices=DATASETS)
    b.add_argument("--root", required=True, help="the dataset's folder")
    b.add_argument("--split", required=True, help="e.g. train_aug, val, training, train")
    b.add_argument("--out", required=True, help="output folder for the shards")
    b.add_argument("--list", dest="list_file", help="sample list (default: the split's own)")
    b.add_argument("--shard-size", default="1GB", help="target shard size (default 1GB)")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    b.add_argument("--seed", type=int, default=0, help="shuffle seed")
    b.add_argument("--num-classes", type=int, help="pairs only: classes incl. background")
    b.add_argument("--skip-bad", action="store_true",
                   help="leave bad samples out (listed in the manifest) instead of failing")

    v = sub.add_parser("verify", help="check checksums (and with --decode every sample)")
    v.add_argument("dir")
    v.add_argument("--decode", action="store_true")

    i = sub.add_parser("inspect", help="counts, class histogram, per-step selection")
    i.add_argument("dir")
    i.add_argument("--dataset", help="(default: the manifest's)")
    i.add_argument("--task", help="a task name or JSON list of class-id lists")
    i.add_argument("--setting", default="overlap", choices=SETTINGS)
    i.add_argument("--json", action="store_true")

    s = sub.add_parser("synth", help="render and shard the synthetic dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--num", type=int, required=True)
    s.add_argument("--classes", type=int, required=True, help="classes incl. background")
    s.add_argument("--size", type=_size, required=True, help="HxW, e.g. 96x128")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", default="64MB")
    return p


def _build(args: argparse.Namespace) -> int:
    if args.dataset == "pairs":
        if not args.num_classes:
            print("error: --dataset pairs needs --num-classes", file=sys.stderr)
            return 2
        spec = generic_spec("pairs", args.num_classes)
    else:
        spec = CSS_DATASETS[args.dataset]
    samples = list_samples(args.dataset, args.root, args.split, args.list_file)
    start = time.perf_counter()
    manifest = build_shards(samples, spec, args.out, args.split, args.shard_size, args.workers,
                            args.seed, skip_bad=args.skip_bad)
    print(f"wrote {len(manifest.samples)} samples in {len(manifest.shards)} shards to {args.out}"
          f" in {time.perf_counter() - start:.1f} s"
          + (f"; left out {len(manifest.rejected)} bad samples" if manifest.rejected else ""))
    return 0


def _verify(args: argparse.Namespace) -> int:
    # verify decodes with torch: imported here, so that --help and the other subcommands
    # start without loading torch
    from icd_dist.data.verify import verify_shards

    report = verify_shards(args.dir, decode=args.decode)
    for problem in report.problems:
        print(problem)
    what = "samples decoded and checked" if args.decode else "checksums checked"
    status = "OK" if report.ok else f"{len(report.problems)} problems"
    print(f"{report.num_shards} shards, {report.num_samples} samples, {what}: {status}")
    return 0 if report.ok else 1


def _inspect(args: argparse.Namespace) -> int:
    task = None
    if args.task:
        manifest = load_manifest(args.dir)
        if args.dataset and args.dataset != manifest.dataset:
            raise ConfigError("--dataset", f"the shards hold {manifest.dataset!r}, not "
                              f"{args.dataset!r}")
        task = get_task(manifest_spec(manifest), args.task, args.setting)
    info = inspect_shards(args.dir, task)
    if args.json:
        print(json.dumps(info))
        return 0
    # the synthetic data's split is named after the dataset: say it once
    name = info["dataset"] if info["split"] == info["dataset"] else \
        f"{info['dataset']} {info['split']}"
    print(f"{name}: {info['num_samples']} samples in "
          f"{info['num_shards']} shards ({info['bytes'] / 1e6:.1f} MB), "
          f"{info['rejected']} rejected at build")
    print("samples per class:")
    for name, n in info["class_histogram"].items():
        print(f"  {name:<24} {n}")
    if task is not None:
        print(f"task {task.name} ({task.setting}):")
        for step in info["task"]["steps"]:
            cls = step["classes"]
            print(f"  step {step['step']}: {step['num_images']:>6} images, "
                  f"class{'es' if len(cls) > 1 else ''} {format_class_ids(cls)}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    manifest = build_synthetic(args.out, args.num, args.classes, args.size, args.seed,
                               args.shard_size)
    print(f"wrote {len(manifest.samples)} synthetic samples ({args.classes} classes) to "
          f"{args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; returns the exit status (0 ok, 1 verify found problems, 2 error)."""
    args = _parser().parse_args(argv)
    handlers = {"build": _build, "verify": _verify, "inspect": _inspect, "synth": _synth}
    try:
        return handlers[args.command](args)
    except (BuildError, ConfigError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

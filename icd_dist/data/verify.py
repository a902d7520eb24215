"""`verify`: check every shard's size and checksum against the manifest, and with `decode`
every sample (image and label decode, sizes equal, ids in range, classes as recorded).

The same check, limited to the shards a run reads and optionally to their sizes, is the
driver's pre-flight before Ray starts (`check_run_shards`)."""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from icd_dist.data import shard_files
from icd_dist.data.errors import BadSampleError, BadShardError
from icd_dist.data.manifest import Manifest, load_manifest
from icd_dist.data.sample_io import decode_sample, read_member
from icd_dist.data.shard_files import ShardFile


@dataclass
class VerifyReport:
    """What verify found: problems, each naming its shard (and sample)."""

    num_shards: int = 0
    num_samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems


def verify_shards(folder: str | Path, decode: bool = False, progress: bool = True,
                  shards: Collection[str] | None = None, checksums: bool = True,
                  manifest: Manifest | None = None) -> VerifyReport:
    """Check the shards of `folder` (a local path or a URI) against its manifest (see the
    module docstring): only those named in `shards` if given; sizes without sha256 when not
    `checksums`; `manifest` if already loaded."""
    manifest = manifest or load_manifest(folder)
    chosen = [s for s in manifest.shards if shards is None or s.name in shards]
    names = {s.name for s in chosen}
    by_shard: dict[str, list] = {}
    for s in manifest.samples:
        if s.shard in names:
            by_shard.setdefault(s.shard, []).append(s)
    report = VerifyReport(len(chosen), sum(len(v) for v in by_shard.values()))
    bar = tqdm(total=report.num_samples if decode else len(chosen), desc="verifying",
               unit="img" if decode else "shard", file=sys.stderr, disable=not progress)
    for shard in chosen:
        path = shard_files.join(folder, shard.name)
        records = by_shard.get(shard.name, [])
        size = shard_files.size(path)
        if size is None:
            report.problems.append(f"shard {shard.name}: missing file")
            bar.update(len(records) if decode else 1)
            continue
        if size != shard.bytes:
            report.problems.append(f"shard {shard.name}: {size} bytes, manifest says "
                                   f"{shard.bytes} (truncated or replaced)")
        elif checksums and shard_files.sha256(path) != shard.sha256:
            report.problems.append(f"shard {shard.name}: sha256 mismatch")
        if len(records) != shard.num_samples:
            report.problems.append(f"shard {shard.name}: manifest lists {len(records)} samples,"
                                   f" shard record says {shard.num_samples}")
        if not decode:
            bar.update(1)
            continue
        with ShardFile(path) as f:
            for rec in records:
                try:
                    jpg = read_member(f, *rec.image, shard.name, rec.key, "image")
                    png = read_member(f, *rec.label, shard.name, rec.key, "label")
                    image, label = decode_sample(jpg, png, rec, manifest.num_classes)
                    if tuple(image.shape[1:]) != (rec.height, rec.width):
                        raise BadSampleError(f"image is {image.shape[2]}x{image.shape[1]}, "
                                             f"manifest says {rec.width}x{rec.height}",
                                             rec.key, shard.name)
                    present = tuple(np.flatnonzero(np.bincount(label.numpy().ravel(),
                                                               minlength=256)).tolist())
                    if present != rec.classes:
                        raise BadSampleError(f"label has classes {present}, manifest says "
                                             f"{rec.classes}", rec.key, shard.name)
                except BadSampleError as exc:
                    report.problems.append(str(exc))
                bar.update(1)
    bar.close()
    return report


def shards_of(manifest: Manifest, keys: Iterable[str]) -> set[str]:
    """The names of the shards that hold these samples."""
    wanted = set(keys)
    return {s.shard for s in manifest.samples if s.key in wanted}


def check_run_shards(folder: str, manifest: Manifest, keys: Iterable[str],
                     checksums: bool = True) -> VerifyReport:
    """The pre-flight of a run: the shards of `folder` that hold `keys` (the samples the steps
    to run read), by size and (with `checksums`) sha256. BadShardError, one line naming the
    folder, each bad shard and why, if any is wrong."""
    report = verify_shards(folder, progress=False, shards=shards_of(manifest, keys),
                           checksums=checksums, manifest=manifest)
    if not report.ok:
        raise BadShardError(folder, report.problems)
    return report

"""`verify`: check every shard's checksum and size against the manifest, and with `decode`
every sample (image and label decode, sizes equal, ids in range, classes as recorded)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from icd_dist.data.errors import BadSampleError
from icd_dist.data.manifest import load_manifest, sha256_of
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


def verify_shards(folder: str | Path, decode: bool = False, progress: bool = True) -> VerifyReport:
    """Check the shards of `folder` against its manifest (see the module docstring)."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    report = VerifyReport(len(manifest.shards), len(manifest.samples))
    by_shard: dict[str, list] = {}
    for s in manifest.samples:
        by_shard.setdefault(s.shard, []).append(s)
    bar = tqdm(total=len(manifest.samples) if decode else len(manifest.shards),
               desc="verifying", unit="img" if decode else "shard", file=sys.stderr,
               disable=not progress)
    for shard in manifest.shards:
        path = folder / shard.name
        records = by_shard.get(shard.name, [])
        if not path.is_file():
            report.problems.append(f"shard {shard.name}: missing file")
            bar.update(len(records) if decode else 1)
            continue
        size = path.stat().st_size
        if size != shard.bytes:
            report.problems.append(f"shard {shard.name}: {size} bytes, manifest says "
                                   f"{shard.bytes} (truncated or replaced)")
        elif sha256_of(path) != shard.sha256:
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

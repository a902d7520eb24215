"""The manifest beside a folder of shards, and the queries on it.

manifest.json:
    {"format": 1, "dataset": "voc", "split": "train_aug", "class_names": [...],
     "samples": [{"key", "shard", "image": [offset, size], "label": [offset, size],
                  "height", "width", "classes": [sorted CSS ids, 255 included if present]}],
     "shards": [{"name", "num_samples", "bytes", "sha256"}], "rejected": [{"key", "reason"}]}

Offsets are those of the member's data inside its tar. Labels in the shards are 8-bit
grayscale PNGs of CSS ids (the dataset's own id mapping already applied). Selection for any
task and step is a query on this file; per-step DALI index files list only the selected
samples of each shard, so nothing is decoded or copied per task.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SampleRecord:
    """Where one sample lives and what it holds."""

    key: str
    shard: str
    image: tuple[int, int]  # data offset, size in bytes
    label: tuple[int, int]
    height: int
    width: int
    classes: tuple[int, ...]

    def to_json(self) -> dict:
        """JSON-ready dict (tuples as lists)."""
        return {**asdict(self), "image": list(self.image), "label": list(self.label),
                "classes": list(self.classes)}

    @classmethod
    def from_json(cls, d: dict) -> SampleRecord:
        """The record to_json wrote."""
        return cls(d["key"], d["shard"], tuple(d["image"]), tuple(d["label"]), d["height"],
                   d["width"], tuple(d["classes"]))


@dataclass(frozen=True)
class ShardRecord:
    """One tar file: its sample count, size and checksum."""

    name: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """The samples and shards of one split."""

    dataset: str
    split: str
    class_names: list[str]
    samples: list[SampleRecord]
    shards: list[ShardRecord]
    rejected: list[dict] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Number of CSS classes (background included)."""
        return len(self.class_names)

    def to_json(self) -> dict:
        """JSON-ready dict."""
        return {
            "format": FORMAT_VERSION, "dataset": self.dataset, "split": self.split,
            "class_names": self.class_names,
            "samples": [s.to_json() for s in self.samples],
            "shards": [asdict(s) for s in self.shards],
            "rejected": self.rejected,
        }

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        """Parse a manifest dict (checks the format version)."""
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"manifest format {data.get('format')!r} is not supported "
                             f"(expected {FORMAT_VERSION}); rebuild the shards")
        samples = [SampleRecord.from_json(s) for s in data["samples"]]
        shards = [ShardRecord(**s) for s in data["shards"]]
        return cls(data["dataset"], data["split"], list(data["class_names"]), samples, shards,
                   list(data.get("rejected", [])))

    def class_sets(self) -> list[tuple[int, ...]]:
        """Per sample, the class ids present (for selection)."""
        return [s.classes for s in self.samples]

    def class_histogram(self) -> np.ndarray:
        """Per class id, the number of samples that contain it."""
        hist = np.zeros(self.num_classes, dtype=np.int64)
        for s in self.samples:
            for c in s.classes:
                if c < self.num_classes:
                    hist[c] += 1
        return hist


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON to a temporary name, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def save_manifest(manifest: Manifest, folder: str | Path) -> Path:
    """Write manifest.json into `folder` atomically; returns its path."""
    path = Path(folder) / MANIFEST_NAME
    write_json_atomic(path, manifest.to_json())
    return path


def load_manifest(folder: str | Path) -> Manifest:
    """Read the manifest of a shard folder (a local path or a URI such as s3://bucket/x); a
    clear error if there is none."""
    from icd_dist.data import shard_files

    path = shard_files.join(folder, MANIFEST_NAME)
    if not shard_files.exists(path):
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {folder}: build the shards with "
                                "`python -m icd_dist.shards build` first")
    return Manifest.from_json(json.loads(shard_files.read_bytes(path)))


def select_records(manifest: Manifest, keys: Sequence[str] | None,
                   where: str | Path) -> list[SampleRecord]:
    """The manifest's records of `keys` in manifest order (all of them for None); KeyError
    naming a few keys that the shard folder `where` does not hold."""
    if keys is None:
        return list(manifest.samples)
    wanted = set(keys)
    records = [r for r in manifest.samples if r.key in wanted]
    if len(records) != len(wanted):
        missing = sorted(wanted - {r.key for r in records})
        raise KeyError(f"{len(missing)} selected keys are not in {where}, e.g. {missing[:3]}")
    return records


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file (local or in an object store), read in chunks."""
    from icd_dist.data import shard_files

    return shard_files.sha256(path, chunk)


def dali_index_lines(samples: Sequence[SampleRecord]) -> str:
    """A DALI webdataset index (v1.2) for these samples of ONE shard, in the given order."""
    lines = [f"v1.2 {len(samples)}"]
    for s in samples:
        lines.append(f"jpg {s.image[0]} {s.image[1]} {s.key}.jpg "
                     f"png {s.label[0]} {s.label[1]} {s.key}.png")
    return "\n".join(lines) + "\n"


def write_step_index(manifest: Manifest, shard_dir: str | Path, keys: Sequence[str],
                     out_dir: str | Path) -> tuple[list[str], list[str]]:
    """Per-shard DALI index files listing only `keys` (shards without any are left out).
    Returns (tar paths, index paths) for fn.readers.webdataset. Files are written atomically
    and re-used when already there with the same content."""
    wanted = set(keys)
    missing = wanted - {s.key for s in manifest.samples}
    if missing:
        raise KeyError(f"{len(missing)} keys are not in the manifest, e.g. {sorted(missing)[:3]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_shard: dict[str, list[SampleRecord]] = {}
    for s in manifest.samples:
        if s.key in wanted:
            by_shard.setdefault(s.shard, []).append(s)
    tars, indexes = [], []
    for shard in manifest.shards:
        selected = by_shard.get(shard.name)
        if not selected:
            continue
        text = dali_index_lines(selected)
        idx = out_dir / f"{Path(shard.name).stem}.idx"
        if not idx.is_file() or idx.read_text() != text:
            tmp = idx.with_name(idx.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, idx)
        tars.append(str(Path(shard_dir) / shard.name))
        indexes.append(str(idx))
    return tars, indexes

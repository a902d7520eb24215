"""Raw dataset readers: the (key, image file, label file) triples of a split.

- voc:    VOC2012/{JPEGImages, SegmentationClassAug or SegmentationClass}; the list is
          --list FILE, or ImageSets/Segmentation/{split}.txt (ids, or "img label" lines).
- ade20k: ADEChallengeData2016/{images,annotations}/{training,validation}; split "train"
          or "training", "val" or "validation".
- camvid: the SegNet layout of ../shared/data/camvid: {split}.txt with "IMAGE LABEL" lines.
- pairs:  --list FILE with "IMAGE LABEL" lines, paths relative to --root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from icd_dist.config import DATASETS as NAMED_DATASETS

# The raw layouts a shard build reads: the named datasets, and pairs (any image/label folders).
DATASETS = (*NAMED_DATASETS, "pairs")
_ADE_SPLITS = {"train": "training", "training": "training", "val": "validation",
               "validation": "validation"}


@dataclass(frozen=True)
class RawSample:
    """One image/label pair on disk; `key` is unique within the split and has no dots."""

    key: str
    image: Path
    label: Path


def _key(stem: str) -> str:
    return stem.replace(".", "_").replace("/", "_")


def _pairs_from_lines(root: Path, list_file: Path) -> list[RawSample]:
    samples = []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{list_file}:{n}: expected 'IMAGE LABEL', got {line!r}")
        image, label = (root / p.lstrip("/") for p in parts)
        samples.append(RawSample(_key(Path(parts[0]).stem), image, label))
    return samples


def _voc(root: Path, split: str, list_file: Path | None) -> list[RawSample]:
    if (root / "VOC2012").is_dir() and not (root / "JPEGImages").is_dir():
        root = root / "VOC2012"
    label_dir = root / "SegmentationClassAug"
    if not label_dir.is_dir():
        label_dir = root / "SegmentationClass"
    list_file = list_file or root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"VOC list file not found: {list_file} (give --list)")
    samples = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        sample_id = Path(line.split()[-1]).stem if " " in line else line
        samples.append(RawSample(_key(sample_id), root / "JPEGImages" / f"{sample_id}.jpg",
                                 label_dir / f"{sample_id}.png"))
    return samples


def _ade20k(root: Path, split: str) -> list[RawSample]:
    if split not in _ADE_SPLITS:
        raise ValueError(f"ADE20K split must be one of {', '.join(_ADE_SPLITS)}, got {split!r}")
    folder = _ADE_SPLITS[split]
    images = sorted((root / "images" / folder).glob("*.jpg"))
    if not images:
        raise FileNotFoundError(f"no images in {root / 'images' / folder}")
    return [RawSample(_key(p.stem), p, root / "annotations" / folder / f"{p.stem}.png")
            for p in images]


def list_samples(dataset: str, root: str | Path, split: str,
                 list_file: str | Path | None = None) -> list[RawSample]:
    """The raw samples of a split, in list order; raises for a missing folder or list and
    for duplicate keys. Missing image/label files are reported by the builder per sample."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    lf = Path(list_file) if list_file else None
    if dataset == "voc":
        samples = _voc(root, split, lf)
    elif dataset == "ade20k":
        samples = _ade20k(root, split)
    elif dataset == "camvid":
        samples = _pairs_from_lines(root, lf or root / f"{split}.txt")
    elif dataset == "pairs":
        if lf is None:
            raise ValueError("--dataset pairs needs --list FILE with 'IMAGE LABEL' lines")
        samples = _pairs_from_lines(root, lf)
    else:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    seen: dict[str, RawSample] = {}
    for s in samples:
        if s.key in seen:
            raise ValueError(f"duplicate sample key {s.key!r}: {seen[s.key].image} and {s.image}")
        seen[s.key] = s
    if not samples:
        raise ValueError(f"{dataset} {split}: the list names no samples")
    return samples

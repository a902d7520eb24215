"""Reading label maps as class ids, and finding which classes every label map of a folder has.

A label PNG holds class ids as pixel values: VOC palette PNGs are read by palette index
(never by colour), grayscale PNGs by value. An RGB label file cannot be interpreted and is
an error that names it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from icd_dist.css.classes import DatasetSpec

_INDEXED_MODES = {"P", "L"}
_INTEGER_MODES = {"I", "I;16", "I;16B", "I;16L"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class LabelFileError(ValueError):
    """A label file that cannot be read as class ids; the message names the file."""


def read_label_ids(path: str | Path) -> np.ndarray:
    """The raw class ids of a label image as a uint8 (H, W) array: palette index for 'P'
    PNGs, the value for grayscale; raises LabelFileError naming the file otherwise."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in _INDEXED_MODES:
                return np.asarray(img, dtype=np.uint8)
            if mode in _INTEGER_MODES:
                arr = np.asarray(img)
                if arr.min() < 0 or arr.max() > 255:
                    raise LabelFileError(f"{path}: label values outside 0..255")
                return arr.astype(np.uint8)
    except LabelFileError:
        raise
    except (OSError, ValueError) as exc:
        raise LabelFileError(f"{path}: cannot read label image ({exc})") from None
    raise LabelFileError(
        f"{path}: label image mode {mode!r} holds colours, not class ids; "
        "expected a palette (P) or grayscale (L) PNG"
    )


def ids_present(ids: np.ndarray) -> list[int]:
    """Sorted distinct values of a uint8 map."""
    return np.flatnonzero(np.bincount(ids.ravel(), minlength=256)).tolist()


def classes_present(raw_ids: np.ndarray, spec: DatasetSpec, source: str = "label map") -> list[int]:
    """Sorted CSS class ids present in a raw label map (255 included when present), after
    the dataset's own id mapping; raises ValueError naming `source` for unknown ids."""
    raw_present = np.asarray(ids_present(raw_ids), dtype=np.int64)
    lut = spec.raw_lut()
    mapped = lut[raw_present]
    if (mapped < 0).any():
        bad = raw_present[mapped < 0].tolist()
        raise ValueError(f"{source}: label ids {bad} are not valid for dataset {spec.name!r}")
    return sorted({int(c) for c in mapped})


def _scan_one(args: tuple[str, DatasetSpec]) -> list[int]:
    path, spec = args
    return classes_present(read_label_ids(path), spec, source=path)


def scan_label_classes(paths: Sequence[str | Path], spec: DatasetSpec,
                       workers: int | None = None, progress: bool = True) -> list[list[int]]:
    """For every label file, its sorted CSS class ids present; in parallel over `workers`
    processes (default: all cores), with a progress bar on stderr."""
    workers = workers or os.cpu_count() or 1
    jobs = [(str(p), spec) for p in paths]
    bar = tqdm(total=len(jobs), desc="reading labels", unit="img", file=sys.stderr,
               disable=not progress)
    try:
        if workers == 1 or len(jobs) < 2:
            results = []
            for job in jobs:
                results.append(_scan_one(job))
                bar.update()
            return results
        chunk = max(1, min(64, len(jobs) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = []
            for result in pool.map(_scan_one, jobs, chunksize=chunk):
                results.append(result)
                bar.update()
            return results
    finally:
        bar.close()


def sample_ids_from_list(list_file: str | Path) -> list[str]:
    """Sample ids named by a list file: one id per line, or lines of paths such as
    "JPEGImages/ID.jpg SegmentationClassAug/ID.png" (the id is the stem of the last path).
    Blank lines and lines starting with '#' are skipped."""
    ids = []
    for line in Path(list_file).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        last = Path(line.split()[-1])
        ids.append(last.stem if last.suffix.lower() in _IMAGE_SUFFIXES else last.name)
    return ids


def label_paths(label_dir: str | Path, list_file: str | Path | None = None) -> list[Path]:
    """The label PNGs of `label_dir`: those named by `list_file` (in its order), or every
    *.png in the folder (sorted). Raises FileNotFoundError naming missing files."""
    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise FileNotFoundError(f"label folder not found: {label_dir}")
    if list_file is None:
        paths = sorted(label_dir.glob("*.png"))
        if not paths:
            raise FileNotFoundError(f"no *.png label files in {label_dir}")
        return paths
    paths = [label_dir / f"{sample_id}.png" for sample_id in sample_ids_from_list(list_file)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{len(missing)} label files named in {list_file} are missing: "
                                f"{shown}{more}")
    if not paths:
        raise FileNotFoundError(f"{list_file} names no samples")
    return paths

"""Building WebDataset shards with a class manifest from raw image/label files.

Samples are shuffled with the seed, packed into tars of about `shard_size` bytes, and
written by worker processes, each shard to a temporary name then renamed. Every shard has a
sidecar JSON (its planned keys, records and rejected samples) and a DALI index; a re-run
skips every shard whose sidecar matches the plan, so an interrupted build resumes. The
manifest is written last.

In the tars: `KEY.jpg` (the source JPEG bytes as they are; other formats re-encoded as JPEG
quality 95) and `KEY.png` (8-bit grayscale PNG of CSS ids).
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from icd_dist.css.classes import DatasetSpec
from icd_dist.data.errors import BadSampleError
from icd_dist.data.labels import LabelFileError, ids_present, read_label_ids
from icd_dist.data.manifest import (
    Manifest,
    SampleRecord,
    ShardRecord,
    dali_index_lines,
    save_manifest,
    sha256_of,
    write_json_atomic,
)
from icd_dist.data.readers import RawSample

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class BuildError(RuntimeError):
    """The build found bad samples (each named) and was not told to skip them."""


def parse_size(text: str | int) -> int:
    """Bytes from '1GB', '64MiB', '500KB' or a plain number."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    unit = (m.group(2) or "").upper() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"bad size {text!r}; use e.g. 1GB, 256MB, 64MiB or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


def shard_name(index: int) -> str:
    """File name of shard `index`."""
    return f"shard-{index:06d}.tar"


def plan_shards(samples: Sequence[RawSample], shard_size: int, seed: int) -> list[list[RawSample]]:
    """Shuffle the samples with `seed` and pack them, in that order, into shards of about
    `shard_size` bytes of source files (at least one sample each)."""
    order = np.random.default_rng(seed).permutation(len(samples))
    shards: list[list[RawSample]] = [[]]
    size = 0
    for i in order:
        s = samples[int(i)]
        nbytes = sum(p.stat().st_size for p in (s.image, s.label) if p.is_file())
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    return shards


def encode_sample(sample: RawSample, spec: DatasetSpec) -> tuple[bytes, bytes, int, int, list[int]]:
    """(jpeg bytes, label png bytes, height, width, classes present) of a raw sample; raises
    BadSampleError naming the sample for a missing/unreadable file, unknown label ids or an
    image/label size mismatch."""
    for what, path in (("image", sample.image), ("label", sample.label)):
        if not path.is_file():
            raise BadSampleError(f"missing {what} file {path}", sample.key)
    data = sample.image.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if img.format != "JPEG":
                out = io.BytesIO()
                img.convert("RGB").save(out, "JPEG", quality=95)
                data = out.getvalue()
    except (OSError, ValueError) as exc:
        raise BadSampleError(f"cannot read image {sample.image}: {exc}", sample.key) from None
    try:
        raw = read_label_ids(sample.label)
        css_ids = spec.to_css_ids(raw, source=str(sample.label))
    except (LabelFileError, ValueError) as exc:
        raise BadSampleError(str(exc), sample.key) from None
    if css_ids.shape != (height, width):
        raise BadSampleError(f"image is {width}x{height} but label is "
                             f"{css_ids.shape[1]}x{css_ids.shape[0]}", sample.key)
    png = io.BytesIO()
    Image.fromarray(css_ids, mode="L").save(png, "PNG")
    return data, png.getvalue(), height, width, ids_present(css_ids)


def _sidecar(tar_path: Path) -> Path:
    return tar_path.with_suffix(".json")


def _shard_is_done(tar_path: Path, keys: list[str]) -> bool:
    side = _sidecar(tar_path)
    if not tar_path.is_file() or not side.is_file():
        return False
    try:
        info = json.loads(side.read_text())
    except json.JSONDecodeError:
        return False
    return info.get("planned") == keys and info.get("bytes") == tar_path.stat().st_size


def write_shard(tar_path: Path, samples: Sequence[RawSample], spec: DatasetSpec) -> dict:
    """Write one shard (tar, DALI index, sidecar JSON) from raw samples; bad samples are left
    out and listed. Returns the sidecar content."""
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    rejected = []
    meta: dict[str, tuple[int, int, list[int]]] = {}
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for s in samples:
            try:
                jpg, png, h, w, classes = encode_sample(s, spec)
            except BadSampleError as exc:
                rejected.append({"key": s.key, "reason": exc.reason})
                continue
            for ext, payload in (("jpg", jpg), ("png", png)):
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size = len(payload)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(payload))
            meta[s.key] = (h, w, classes)
    # Data offsets come from reading the headers back (exact for any name length).
    offsets: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(tmp, "r") as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            offsets.setdefault(key, {})[ext] = (m.offset_data, m.size)
    records = [SampleRecord(key, tar_path.name, offsets[key]["jpg"], offsets[key]["png"], h, w,
                            tuple(classes)) for key, (h, w, classes) in meta.items()]
    os.replace(tmp, tar_path)
    idx = tar_path.with_suffix(".idx")
    idx.write_text(dali_index_lines(records))
    side = {
        "planned": [s.key for s in samples],
        "samples": [r.to_json() for r in records],
        "rejected": rejected,
        "bytes": tar_path.stat().st_size,
        "sha256": sha256_of(tar_path),
    }
    write_json_atomic(_sidecar(tar_path), side)
    return side


def _write_shard_job(args: tuple[str, list[RawSample], DatasetSpec]) -> dict:
    path, samples, spec = args
    return write_shard(Path(path), samples, spec)


def build_shards(samples: Sequence[RawSample], spec: DatasetSpec, out_dir: str | Path,
                 split: str, shard_size: int | str = "1GB", workers: int = 1, seed: int = 0,
                 skip_bad: bool = False, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> Manifest:
    """Build (or resume) the shards of `samples` into `out_dir` and write its manifest.

    Bad samples are always left out of the tars and named; unless `skip_bad`, their presence
    raises BuildError (listing every one) and no manifest is written."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(samples, parse_size(shard_size), seed)
    sidecars: dict[int, dict] = {}
    todo = []
    for i, group in enumerate(plan):
        path = out / shard_name(i)
        if _shard_is_done(path, [s.key for s in group]):
            sidecars[i] = json.loads(_sidecar(path).read_text())
        else:
            todo.append((i, str(path), group))
    if sidecars:
        log(f"resuming: {len(sidecars)} of {len(plan)} shards already written")
    bar = tqdm(total=sum(len(g) for _, _, g in todo), desc="writing shards", unit="img",
               file=sys.stderr, disable=not progress)
    try:
        if workers <= 1 or len(todo) <= 1:
            for i, path, group in todo:
                sidecars[i] = write_shard(Path(path), group, spec)
                bar.update(len(group))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(_write_shard_job, (path, group, spec)): (i, len(group))
                           for i, path, group in todo}
                for fut in as_completed(futures):
                    i, n = futures[fut]
                    sidecars[i] = fut.result()
                    bar.update(n)
    finally:
        bar.close()
    for stale in sorted(out.glob("shard-*.tar")):
        index = int(stale.stem.split("-")[1])
        if index >= len(plan):  # left from an earlier build with more shards
            for p in (stale, stale.with_suffix(".json"), stale.with_suffix(".idx")):
                p.unlink(missing_ok=True)
    rejected = [r for i in range(len(plan)) for r in sidecars[i]["rejected"]]
    if rejected and not skip_bad:
        listing = "\n".join(f"  {r['key']}: {r['reason']}" for r in rejected)
        raise BuildError(f"{len(rejected)} bad samples (re-run with --skip-bad to leave them "
                         f"out):\n{listing}")
    records, shards = [], []
    for i in range(len(plan)):
        side = sidecars[i]
        recs = [SampleRecord.from_json(d) for d in side["samples"]]
        records.extend(recs)
        shards.append(ShardRecord(shard_name(i), len(recs), side["bytes"], side["sha256"]))
    manifest = Manifest(spec.name, split, list(spec.class_names), records, shards, rejected)
    save_manifest(manifest, out)
    if rejected:
        log(f"left out {len(rejected)} bad samples (listed in the manifest under 'rejected')")
    return manifest

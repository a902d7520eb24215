"""`inspect`: what a shard folder holds, and what a task selects from it (manifest only)."""

from __future__ import annotations

from pathlib import Path

from icd_dist.css.classes import DATASETS, DatasetSpec, generic_spec
from icd_dist.css.selection import (
    eval_selection_mask,
    images_per_step,
    presence_matrix,
    selection_mask,
)
from icd_dist.css.tasks import Task
from icd_dist.data.manifest import Manifest, load_manifest


def manifest_spec(manifest: Manifest) -> DatasetSpec:
    """The DatasetSpec of a manifest's dataset (registered datasets by name, others from the
    class names the manifest records)."""
    if manifest.dataset in DATASETS:
        spec = DATASETS[manifest.dataset]
        if list(spec.class_names) != manifest.class_names:
            raise ValueError(f"manifest of {manifest.dataset!r} lists other class names than "
                             "this version of icd_dist; rebuild the shards")
        return spec
    return generic_spec(manifest.dataset, manifest.num_classes, tuple(manifest.class_names))


def selected_keys(manifest: Manifest, task: Task, step: int) -> list[str]:
    """Keys of the samples that `step` of `task` trains on (the task's setting)."""
    presence = presence_matrix(manifest.class_sets(), manifest.num_classes)
    mask = selection_mask(presence, task, step)
    return [s.key for s, keep in zip(manifest.samples, mask, strict=True) if keep]


def eval_selected_keys(manifest: Manifest, task: Task, step: int,
                       filtered: bool = True) -> list[str]:
    """Keys of the evaluation samples that `step` of `task` is scored on: those with a class
    seen up to `step` other than background (MiB/PLOP's test set, `eval_selection_mask`), or
    every sample of the manifest when not `filtered` (data.eval_filter=false)."""
    if not filtered:
        return [s.key for s in manifest.samples]
    presence = presence_matrix(manifest.class_sets(), manifest.num_classes)
    mask = eval_selection_mask(presence, task, step)
    return [s.key for s, keep in zip(manifest.samples, mask, strict=True) if keep]


def inspect_shards(folder: str | Path, task: Task | None = None) -> dict:
    """Sample and shard counts, per-class sample counts, and per-step image counts of `task`."""
    manifest = load_manifest(folder)
    hist = manifest.class_histogram()
    out = {
        "dataset": manifest.dataset, "split": manifest.split,
        "num_samples": len(manifest.samples), "num_shards": len(manifest.shards),
        "bytes": sum(s.bytes for s in manifest.shards), "rejected": len(manifest.rejected),
        "class_histogram": {name: int(hist[i]) for i, name in enumerate(manifest.class_names)},
    }
    if task is not None:
        counts = images_per_step(manifest.class_sets(), task)
        out["task"] = {**task.to_dict()}
        for step, n in zip(out["task"]["steps"], counts, strict=True):
            step["num_images"] = n
    return out

"""Validation of a step's model, the one code path for the workers (after an epoch and at the
end of a step) and for `python -m icd_dist.evaluate`: the step's evaluation loader (its
selected images, the step's test labels: seen classes kept, unseen -> 0), the confusion
matrix summed over the workers, and the step's metrics (old/new/all mIoU, hIoU, per class).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from icd_dist.config import Config
from icd_dist.css.remap import eval_lut
from icd_dist.css.tasks import Task
from icd_dist.data.pipeline import StepLoader
from icd_dist.train.metrics import ConfusionMatrix, StepMetrics, step_metrics
from icd_dist.train.tracking import overlay_image


def eval_loader(cfg: Config, task: Task, step: int, shards: str | Path, keys: Sequence[str],
                rank: int = 0, world: int = 1, device_id: int | None = None,
                batch_size: int | None = None) -> StepLoader:
    """This rank's loader over the evaluation images `keys` of `shards` with the test labels
    of `step` (data.eval_unseen, data.ignore_background), resized as data.eval_size says;
    eval.batch_size images per batch unless `batch_size` is given."""
    lut = eval_lut(task, step, cfg.data.ignore_background, cfg.data.eval_unseen)
    return StepLoader(cfg.data, shards, keys, lut, False, batch_size or cfg.eval.batch_size,
                      rank=rank, world_size=world, seed=cfg.run.seed, device_id=device_id,
                      num_threads=cfg.engine.dali_threads)


def evaluate(model: torch.nn.Module, loader, num_classes: int, device: torch.device,
             overlays: int = 0, bad: dict | None = None) -> tuple[ConfusionMatrix, list]:
    """Confusion matrix (all-reduced over the workers) of `model` on `loader`, and up to
    `overlays` (image, prediction, ground truth) triples from this rank; the bad samples the
    loader skipped are added to `bad` if given (see note_bad_samples). The model runs in its
    weights' dtype: fp32 for a student of either engine in fp32 or bf16 (engine.py)."""
    cm = ConfusionMatrix(num_classes, device=device)
    kept: list = []
    model.eval()
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for batch in loader:
            if bad is not None:
                note_bad_samples(bad, batch)
            if batch.images.numel() == 0:
                continue
            images = batch.images.to(device, non_blocking=True)
            labels = batch.labels.to(device)
            logits = model(images.to(dtype)).logits
            pred = model.predict(logits)  # the argmax, or the classifier's own rule (DKD)
            cm.update(pred, labels)
            for k in range(min(overlays - len(kept), images.shape[0])):
                kept.append((overlay_image(images[k].float().cpu().numpy()),
                             pred[k].cpu().numpy().astype("uint8"),
                             labels[k].clamp(max=255).cpu().numpy().astype("uint8")))
    cm.all_reduce()
    return cm, kept


def step_scores(cm: ConfusionMatrix, task: Task, step: int) -> StepMetrics:
    """The metrics of `step` from its confusion matrix: old = the step-0 classes (with
    background), new = the rest, all; hIoU; per-class IoU by class name."""
    names = [task.class_name(c) for c in task.seen_classes(step)]
    return step_metrics(cm, names, len(task.steps[0]))


def validate(model: torch.nn.Module, loader, task: Task, step: int, device: torch.device,
             overlays: int = 0, bad: dict | None = None) -> tuple[StepMetrics, list]:
    """The metrics of `model` as the model of `step` on `loader` (every worker's images
    together) and this rank's overlays (see evaluate)."""
    cm, kept = evaluate(model, loader, task.num_seen(step), device, overlays, bad)
    return step_scores(cm, task, step), kept


def note_bad_samples(bad: dict[tuple[str, str], str], batch) -> None:
    """Add the samples a batch skipped to `bad` ((shard, key) -> reason): each sample once,
    however often it is met."""
    for b in batch.bad_samples:
        bad.setdefault((b.shard, b.key), b.reason)

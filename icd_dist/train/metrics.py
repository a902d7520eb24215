"""Segmentation metrics of the CSS protocol from a streaming confusion matrix.

The matrix is indexed by logit index (rows = ground truth, columns = prediction); 255 in the
ground truth is ignored. Matrices from several workers add up (`merge`, or `all_reduce` in a
torch.distributed group), so every worker can score its own shard of the evaluation set.

From the matrix: IoU per class = TP / (TP + FP + FN); mIoU is the mean IoU over the seen
classes that have ground truth; old = the step-0 classes (background included), new = the
rest of the seen classes, all = every seen class; hIoU = 2 * old * new / (old + new).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from icd_dist.css.classes import IGNORE_INDEX


class ConfusionMatrix:
    """A (num_classes x num_classes) int64 confusion matrix accumulated batch by batch."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor,
               ignore_index: int = IGNORE_INDEX) -> None:
        """Add a batch: `pred` and `target` hold class indices of the same shape; target
        pixels equal to `ignore_index` are skipped. Raises ValueError for indices out of range."""
        if pred.shape != target.shape:
            raise ValueError(
                f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}"
            )
        target = target.reshape(-1).long()
        pred = pred.reshape(-1).long()
        keep = target != ignore_index
        target, pred = target[keep], pred[keep]
        n = self.num_classes
        if target.numel():
            if target.min() < 0 or target.max() >= n:
                raise ValueError(f"ground-truth ids outside 0..{n - 1} (and {ignore_index})")
            if pred.min() < 0 or pred.max() >= n:
                raise ValueError(f"predicted ids outside 0..{n - 1}")
        counts = torch.bincount(target * n + pred, minlength=n * n)
        self.matrix += counts.reshape(n, n).to(self.matrix.device)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another worker's matrix into this one (in place); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a "
                             f"{self.num_classes}-class one")
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum this matrix over every process of the default torch.distributed group (in
        place; a no-op without one); returns self."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        return self

    def reset(self) -> None:
        """Zero the counts."""
        self.matrix.zero_()

    def iou(self) -> list[float | None]:
        """IoU of every class, None for a class without ground truth (it has no IoU to score)."""
        m = self.matrix.double().cpu()
        tp = m.diag()
        gt = m.sum(dim=1)
        predicted = m.sum(dim=0)
        union = gt + predicted - tp
        return [float(tp[i] / union[i]) if gt[i] > 0 else None for i in range(self.num_classes)]


@dataclass(frozen=True)
class StepMetrics:
    """The scores of one step: mIoU over old/new/all seen classes, hIoU, per-class IoU.

    A mean over an empty set (e.g. new classes at step 0) is None."""

    miou_old: float | None
    miou_new: float | None
    miou_all: float | None
    hiou: float | None
    per_class_iou: dict[str, float | None]
    pixel_accuracy: float | None

    def scalars(self) -> dict[str, float]:
        """The scalar scores that are defined (for logging)."""
        values = {"miou_old": self.miou_old, "miou_new": self.miou_new,
                  "miou_all": self.miou_all, "hiou": self.hiou,
                  "pixel_accuracy": self.pixel_accuracy}
        return {k: v for k, v in values.items() if v is not None}

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "miou_old": self.miou_old, "miou_new": self.miou_new, "miou_all": self.miou_all,
            "hiou": self.hiou, "pixel_accuracy": self.pixel_accuracy,
            "per_class_iou": dict(self.per_class_iou),
        }


def _mean(values: Sequence[float | None]) -> float | None:
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else None


def harmonic_iou(old: float | None, new: float | None) -> float | None:
    """2 * old * new / (old + new); 0 when both are 0; None when either is missing."""
    if old is None or new is None:
        return None
    return 0.0 if old + new == 0 else 2 * old * new / (old + new)


def step_metrics(cm: ConfusionMatrix, class_names: Sequence[str], num_old: int) -> StepMetrics:
    """Scores of a step from its confusion matrix.

    `cm` covers the seen classes (logit indices 0..n-1); `class_names[i]` names index i; the
    first `num_old` indices are the old (step-0) classes, background included."""
    if len(class_names) != cm.num_classes:
        raise ValueError(f"{len(class_names)} class names for a {cm.num_classes}-class matrix")
    if not 0 < num_old <= cm.num_classes:
        raise ValueError(f"num_old must be in 1..{cm.num_classes}, got {num_old}")
    iou = cm.iou()
    old, new = _mean(iou[:num_old]), _mean(iou[num_old:])
    total = int(cm.matrix.sum())
    accuracy = float(cm.matrix.diag().sum()) / total if total else None
    return StepMetrics(
        miou_old=old,
        miou_new=new,
        miou_all=_mean(iou),
        hiou=harmonic_iou(old, new),
        per_class_iou={name: v for name, v in zip(class_names, iou, strict=True)},
        pixel_accuracy=accuracy,
    )


def _pct(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{100 * value:6.2f}"


def format_per_class_table(metrics: StepMetrics, num_old: int) -> str:
    """A text table of the per-class IoU (in %), marking old and new classes; '-' = no
    ground truth in the evaluation set."""
    names = list(metrics.per_class_iou)
    width = max([len("class"), *(len(n) for n in names)])
    lines = [f"{'idx':>3}  {'class':<{width}}  {'group':<5}  {'IoU %':>6}"]
    for i, name in enumerate(names):
        group = "old" if i < num_old else "new"
        lines.append(f"{i:>3}  {name:<{width}}  {group:<5}  {_pct(metrics.per_class_iou[name])}")
    lines.append(
        f"mIoU old {_pct(metrics.miou_old).strip()}  new {_pct(metrics.miou_new).strip()}  "
        f"all {_pct(metrics.miou_all).strip()}  hIoU {_pct(metrics.hiou).strip()}"
    )
    return "\n".join(lines)

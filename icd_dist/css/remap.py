"""Label remapping at step t of a task, as the CSS protocol defines it (DESIGN.md).

- Training labels: the classes new at step t keep their id (their logit index), every other
  class becomes background 0, 255 stays 255.
- Test labels: every class seen up to step t keeps its id; unseen classes become 0
  (unseen="background", PLOP's dataset/voc.py and ade.py: "Future classes will be considered
  as background") or 255 (unseen="ignore", MiB's: its test set masks them with 255).
- `ignore_background` (ADE20K as MiB's dataset/ade.py): the dataset's own id 0 becomes 255 in
  the test labels only; training labels keep it as background 0 (MiB trains with it).

Each rule is one lookup table of 256 entries over the CSS ids of a uint8 label map; ids the
dataset does not have are marked -1 and make `apply_lut` raise instead of passing through.
`apply_lut` checks every label map (the torch pipeline applies it per sample on the CPU,
where checks are free, and names the sample); `DeviceLut` applies a table on the labels'
device with no check, so without a host synchronisation per batch (the DALI pipeline's
batches, whose ids the shard builder validated: an id outside the dataset would give -1).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import numpy as np

from icd_dist.css.classes import IGNORE_INDEX
from icd_dist.css.tasks import Task

if TYPE_CHECKING:
    import torch

INVALID = -1
UNSEEN = ("background", "ignore")  # eval_lut: what unseen classes become


def _lut(task: Task, keep: Iterable[int], ignore_background: bool,
         others: int = 0) -> np.ndarray:
    num_classes = task.spec.num_classes
    lut = np.full(256, INVALID, dtype=np.int16)
    lut[:num_classes] = others
    lut[0] = 0
    for c in keep:
        lut[c] = task.index_of(c)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    if ignore_background:
        lut[0] = IGNORE_INDEX
    return lut


def train_lut(task: Task, step: int, ignore_background: bool = False) -> np.ndarray:
    """Lookup table (int16[256]) for training labels at `step`: current classes -> their
    index, other classes -> 0, 255 -> 255, ids outside the dataset -> -1.

    `ignore_background` changes nothing here (accepted so that callers pass the data config
    alike to both tables): as MiB's dataset/ade.py, id 0 stays background 0 in training and
    is ignored only in the test labels (`eval_lut`)."""
    return _lut(task, task.classes_at(step), False)


def eval_lut(task: Task, step: int, ignore_background: bool = False,
             unseen: Literal["background", "ignore"] = "background") -> np.ndarray:
    """Lookup table (int16[256]) for evaluation (test) labels at `step`: seen classes -> their
    index, unseen classes -> 0 (unseen="background", PLOP) or 255 (unseen="ignore", MiB),
    255 -> 255, ids outside the dataset -> -1; with `ignore_background` the dataset's id 0
    -> 255 (ADE20K as MiB)."""
    if unseen not in UNSEEN:
        raise ValueError(f"unseen must be one of {', '.join(UNSEEN)}, got {unseen!r}")
    others = 0 if unseen == "background" else IGNORE_INDEX
    return _lut(task, task.seen_classes(step), ignore_background, others)


def apply_lut(lut: np.ndarray, labels: np.ndarray | torch.Tensor,
              source: str = "label map") -> np.ndarray | torch.Tensor:
    """Remap a label map of CSS ids with `lut`, vectorised.

    numpy in -> uint8 numpy out; torch in -> int64 tensor on the same device (what the
    losses take). Raises ValueError naming `source` if a label id is outside the dataset."""
    if _is_tensor(labels):
        import torch

        table = torch.as_tensor(lut, device=labels.device).long()
        if labels.dtype not in (torch.uint8, torch.int16, torch.int32, torch.int64):
            raise TypeError(f"{source}: labels must be an integer tensor, got {labels.dtype}")
        if labels.numel() and (labels.min() < 0 or labels.max() > 255):
            raise ValueError(f"{source}: label ids must lie in 0..255")
        out = table[labels.long()]
        if (out == INVALID).any():
            bad = torch.unique(labels[out == INVALID]).tolist()
            raise ValueError(f"{source}: label ids {bad} are not classes of this dataset")
        return out
    arr = np.asarray(labels)
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"{source}: label ids must lie in 0..255")
        arr = arr.astype(np.uint8)
    out = lut[arr]
    if (out == INVALID).any():
        bad = sorted(int(v) for v in np.unique(arr[out == INVALID]))
        raise ValueError(f"{source}: label ids {bad} are not classes of this dataset")
    return out.astype(np.uint8)


class DeviceLut:
    """A lookup table applied to uint8 label batches on their own device without checks (no
    host synchronisation): the int64 table is uploaded once per device and kept."""

    def __init__(self, lut: np.ndarray):
        self.lut = lut
        self._tables: dict[torch.device, torch.Tensor] = {}

    def table(self, device: torch.device) -> torch.Tensor:
        """The int64 table on `device` (built at its first use there)."""
        table = self._tables.get(device)
        if table is None:
            import torch

            table = self._tables[device] = torch.as_tensor(self.lut).long().to(device)
        return table

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        """int64 labels on the labels' device: the table's entry for each id of the integer
        tensor `labels` (ids in 0..255; ids outside the dataset give INVALID, unchecked)."""
        return self.table(labels.device)[labels.long()]


def _is_tensor(x) -> bool:
    """Whether `x` is a torch tensor; torch is not imported for it (a process that has not
    imported torch holds no tensor), so the protocol's modules load without torch."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)

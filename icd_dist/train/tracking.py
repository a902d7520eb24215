"""W&B tracking from rank 0: one W&B run per step, grouped by the run name.

Mode: logging.wandb, else WANDB_MODE, else offline (files in the run folder). Online needs
WANDB_API_KEY in the environment; the key is read by wandb itself and never written to a
config, a log or the run folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def wandb_mode(configured: str | None) -> str:
    """offline / online / disabled from the config, then WANDB_MODE, then offline."""
    mode = configured or os.environ.get("WANDB_MODE") or "offline"
    if mode == "dryrun":
        mode = "offline"
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"WANDB_MODE={mode!r}; allowed: offline, online, disabled")
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ValueError("W&B online mode needs WANDB_API_KEY in the environment "
                         "(or set logging.wandb=offline)")
    return mode


class Tracker:
    """A thin W&B run (or nothing when disabled / not rank 0)."""

    def __init__(self, enabled: bool, mode: str, folder: Path, project: str, entity: str | None,
                 group: str, name: str, config: Mapping):
        self.run = None
        if not enabled or mode == "disabled":
            return
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, entity=entity, group=group, name=name,
                              dir=str(folder), mode=mode, config=dict(config),
                              reinit="create_new", settings=wandb.Settings(
                                  console="off", silent=True, x_disable_stats=True))

    def log(self, data: Mapping, at: int | None = None) -> None:
        """Log scalars at x-axis value `at` (W&B's "step": the iteration in a step's run, the
        task step in a sweep trial's run)."""
        if self.run is not None:
            self.run.log(dict(data), step=at)

    def log_step_result(self, metrics: Mapping, per_class: Mapping[str, float | None],
                        overlays: list, at: int | None = None) -> None:
        """A step's metrics (scalars), the per-class IoU table and prediction overlays, at
        x-axis value `at` (the step's last iteration)."""
        if self.run is None:
            return
        import wandb

        table = wandb.Table(columns=["class", "iou"],
                            data=[[k, v] for k, v in per_class.items()])
        images = [wandb.Image(img, masks={"prediction": {"mask_data": pred},
                                          "ground_truth": {"mask_data": gt}})
                  for img, pred, gt in overlays]
        self.run.log({**{f"eval/{k}": v for k, v in metrics.items()},
                      "eval/per_class_iou": table, "eval/overlays": images}, step=at)

    def finish(self) -> None:
        """Close the run (flushes the offline files)."""
        if self.run is not None:
            self.run.finish()
            self.run = None


def overlay_image(image: np.ndarray) -> np.ndarray:
    """A normalised float (3, H, W) image back to uint8 (H, W, 3) for display."""
    from icd_dist.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean = np.array(IMAGENET_MEAN).reshape(3, 1, 1)
    std = np.array(IMAGENET_STD).reshape(3, 1, 1)
    return np.clip((image * std + mean) * 255, 0, 255).astype(np.uint8).transpose(1, 2, 0)

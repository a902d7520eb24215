"""`python -m icd_dist.run`: train a whole incremental schedule (step 0, then every
incremental step) with Ray Train; also `ray job submit --working-dir . -- python -m
icd_dist.run ...` on a cluster.

    python -m icd_dist.run --config configs/demo.yaml
    python -m icd_dist.run --config configs/voc/15-1_icd.yaml optim.lr=0.02 run.name=my-run
    python -m icd_dist.run --config configs/camvid/6-1_mib.yaml --step0-from runs/camvid-step0

--step0-from takes step 0 from another run's finished step 0 (same dataset, step-0 classes,
model; e.g. one trained once for several methods) instead of training it; --last-step stops
the schedule after that step (--last-step 0 trains only the shareable step 0).
"""

from __future__ import annotations

import argparse
import sys

from icd_dist.cli import run_config_command
from icd_dist.config import Config


def run(cfg: Config, args: argparse.Namespace | None = None) -> dict:
    """Train the schedule of `cfg`; the run name and its final all-mIoU and hIoU."""
    from icd_dist.train.schedule import run_schedule

    summary = run_schedule(cfg, step0_from=getattr(args, "step0_from", None),
                           last_step=getattr(args, "last_step", None))
    last = summary["steps"][-1]
    return {"run": summary["run"], "final_miou_all": last["miou_all"],
            "final_hiou": last["hiou"]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `icd_dist.run` besides --config and the overrides."""
    p.add_argument("--step0-from", metavar="RUN_FOLDER", help="take step 0 from this run "
                   "folder (path or URI) whose step 0 is finished, instead of training it")
    p.add_argument("--last-step", type=int, metavar="N", help="stop after step N")


def main(argv: list[str] | None = None) -> int:
    """Run the schedule; returns the exit status (0 done, 2 configuration or input error)."""
    return run_config_command("python -m icd_dist.run", __doc__,
                              "experiment YAML (may extend others)", "optim.lr=0.02", run, argv,
                              add_arguments)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m icd_dist.run`: train a whole incremental schedule (step 0, then every
incremental step) with Ray Train; also `ray job submit --working-dir . -- python -m
icd_dist.run ...` on a cluster.

    python -m icd_dist.run --config configs/demo.yaml
    python -m icd_dist.run --config configs/voc/15-1_icd.yaml optim.lr=0.02 run.name=my-run
"""

from __future__ import annotations

import sys

from icd_dist.cli import run_config_command
from icd_dist.config import Config


def run(cfg: Config) -> dict:
    """Train the schedule of `cfg`; the run name and its final all-mIoU and hIoU."""
    from icd_dist.train.schedule import run_schedule

    summary = run_schedule(cfg)
    last = summary["steps"][-1]
    return {"run": summary["run"], "final_miou_all": last["miou_all"],
            "final_hiou": last["hiou"]}


def main(argv: list[str] | None = None) -> int:
    """Run the schedule; returns the exit status (0 done, 2 configuration or input error)."""
    return run_config_command("python -m icd_dist.run", __doc__,
                              "experiment YAML (may extend others)", "optim.lr=0.02", run, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m icd_dist.tune`: a Ray Tune sweep of the ICD distillation weights over several
incremental schedules at once (each trial a whole schedule; step 0 trained once per key).

    python -m icd_dist.tune --config configs/tune/demo.yaml
    python -m icd_dist.tune --config configs/tune/camvid_icd.yaml tune.num_samples=16

Re-running with the same run.name resumes the sweep.
"""

from __future__ import annotations

import sys

from icd_dist.cli import run_config_command
from icd_dist.config import Config


def sweep(cfg: Config, args=None) -> dict:
    """Run (or resume) the sweep of `cfg`; its name, best weights and best config files."""
    from icd_dist.train.sweep import run_sweep

    summary = run_sweep(cfg)
    return {"sweep": summary["sweep"], "best_overall": summary["best_overall"],
            "best_configs": summary["best_configs"]}


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; returns the exit status (0 done, 2 configuration or input error)."""
    return run_config_command("python -m icd_dist.tune", __doc__,
                              "sweep YAML (a run config with a tune: part)",
                              "tune.num_samples=16", sweep, argv)


if __name__ == "__main__":
    sys.exit(main())

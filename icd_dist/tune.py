"""`python -m icd_dist.tune`: a Ray Tune sweep of the ICD distillation weights over several
incremental schedules at once (each trial a whole schedule; step 0 trained once per key).

    python -m icd_dist.tune --config configs/tune/demo.yaml
    python -m icd_dist.tune --config configs/tune/camvid_icd.yaml tune.num_samples=16

Re-running with the same run.name resumes the sweep.
"""

from __future__ import annotations

import argparse
import json
import sys

from icd_dist.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; returns the exit status (0 done, 2 configuration or input error)."""
    p = argparse.ArgumentParser(prog="python -m icd_dist.tune",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="sweep YAML (a run config with a tune: part)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. tune.num_samples=16")
    p.add_argument("--print-config", action="store_true", help="print the resolved config "
                   "and exit")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        from icd_dist.config import dump_config

        print(dump_config(cfg))
        return 0
    from icd_dist.train.sweep import run_sweep

    try:
        summary = run_sweep(cfg)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"sweep": summary["sweep"], "best_overall": summary["best_overall"],
                      "best_configs": summary["best_configs"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m icd_dist.run`: train a whole incremental schedule (step 0, then every
incremental step) with Ray Train; also `ray job submit --working-dir . -- python -m
icd_dist.run ...` on a cluster.

    python -m icd_dist.run --config configs/demo.yaml
    python -m icd_dist.run --config configs/voc/15-1_icd.yaml optim.lr=0.02 run.name=my-run
"""

from __future__ import annotations

import argparse
import json
import sys

from icd_dist.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    """Run the schedule; returns the exit status (0 done, 2 configuration or input error)."""
    p = argparse.ArgumentParser(prog="python -m icd_dist.run", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--config", required=True, help="experiment YAML (may extend others)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.02")
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
    from icd_dist.train.schedule import run_schedule

    try:
        summary = run_schedule(cfg)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    last = summary["steps"][-1]
    print(json.dumps({"run": summary["run"], "final_miou_all": last["miou_all"],
                      "final_hiou": last["hiou"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

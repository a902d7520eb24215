"""`python -m icd_dist.evaluate`: evaluate a step's model of a run on any shards, with the
step's seen classes and the same metrics as training: the same images (data.eval_filter:
those with a class seen up to the step other than background, MiB/PLOP's test set), the same
labels (data.eval_unseen, data.ignore_background), the same loader and the same scoring as
the run's own evaluation (train/validation.py, which the workers run).

    python -m icd_dist.evaluate --run runs/demo [--step K] --data data/demo/val [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from icd_dist.config import ConfigError, config_from_dict, update
from icd_dist.css.tasks import task_from_config
from icd_dist.data.inspect import eval_selected_keys, manifest_spec
from icd_dist.data.manifest import load_manifest
from icd_dist.train.run_folder import RunFolder

# torch and the model are imported by evaluate_run only, so that --help answers at once.


def evaluate_run(run: str, data: str, step: int | None = None, batch_size: int = 8,
                 workers: int = 0) -> dict:
    """Metrics of step `step` (default: the last complete one) of run folder/URI `run` on the
    shards in `data`."""
    import torch

    from icd_dist.methods import inference_state
    from icd_dist.models.deeplab import build_model
    from icd_dist.train.metrics import format_per_class_table
    from icd_dist.train.validation import eval_loader, validate

    folder = RunFolder(run)
    if not folder.has_config():
        raise FileNotFoundError(f"{run} is not a run folder (no config.yaml)")
    cfg = config_from_dict(yaml.safe_load(folder.read_config()) or {})
    cfg = update(cfg, {"data.loader_workers": workers})
    manifest = load_manifest(data)
    task = task_from_config(cfg, manifest_spec(manifest))
    done = folder.done_steps(task.num_steps)
    if step is None:
        if not done:
            raise FileNotFoundError(f"no complete step in {folder.uri()}")
        step = done[-1]
    if not 0 <= step < task.num_steps:
        raise ValueError(f"step {step}: the run has steps 0-{task.num_steps - 1} "
                         f"({task.name})")
    if step not in done:
        raise FileNotFoundError(f"step {step} of {run} is not complete (complete steps: "
                                f"{', '.join(map(str, done)) or 'none'})")
    saved = folder.load_model(step)
    model = build_model(cfg.model, saved["classes_per_step"], load_pretrained=False)
    model.load_state_dict(inference_state(saved["state_dict"]))
    keys = eval_selected_keys(manifest, task, step, cfg.data.eval_filter)
    if not keys:
        raise ValueError(f"no image in {data} has a class seen up to step {step} "
                         "(data.eval_filter)")
    loader = eval_loader(cfg, task, step, data, keys, batch_size=batch_size)
    metrics, _ = validate(model, loader, task, step, torch.device("cpu"))
    return {"run": run, "step": step, "data": str(data), "images": len(keys),
            **metrics.to_dict(), "table": format_per_class_table(metrics, len(task.steps[0]))}


def main(argv: list[str] | None = None) -> int:
    """Evaluate and print; returns the exit status (0 ok, 2 bad input)."""
    p = argparse.ArgumentParser(prog="python -m icd_dist.evaluate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run folder (or URI) written by icd_dist.run")
    p.add_argument("--step", type=int, help="step to evaluate (default: the last complete)")
    p.add_argument("--data", required=True, help="shard folder to evaluate on")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        result = evaluate_run(args.run, args.data, args.step, args.batch_size)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = result.pop("table")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.run} step {result['step']} on {args.data} ({result['images']} images)")
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m icd_dist.tasks`: show the steps of an incremental task, and optionally how many
training images each step selects from a folder of label maps.

    python -m icd_dist.tasks --dataset voc --task 15-1 --json
    python -m icd_dist.tasks --dataset voc --task 15-1 --setting disjoint \\
        --labels VOC2012/SegmentationClassAug --list train_aug.txt
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from icd_dist.config import ConfigError
from icd_dist.css.classes import DATASETS
from icd_dist.css.selection import images_per_step
from icd_dist.css.tasks import SETTINGS, Task, get_task
from icd_dist.data.labels import LabelFileError, label_paths, scan_label_classes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m icd_dist.tasks",
        description="Show the classes of every step of a continual-segmentation task; with "
                    "--labels, also the number of training images each step selects.",
    )
    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--task", required=True,
                   help='a registered task (e.g. 15-1) or a JSON list of class-id lists, '
                        'e.g. "[[0,1,2],[3]]"')
    p.add_argument("--setting", default="overlap", choices=SETTINGS)
    p.add_argument("--labels", metavar="DIR", help="folder of label PNGs (pixel values = class "
                   "ids in the dataset's own numbering)")
    p.add_argument("--list", metavar="FILE", dest="list_file",
                   help="sample list: one id per line, or lines such as "
                        "'JPEGImages/ID.jpg SegmentationClassAug/ID.png'; default: every PNG")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def format_task_table(task: Task, counts: list[int] | None) -> str:
    """Human-readable table of a task's steps (class ids and names, and image counts)."""
    header = f"{task.dataset} {task.name} ({task.setting}), {task.num_steps} steps, " \
             f"{len(task.class_order)} classes"
    lines = [header, f"{'step':>4}  {'#cls':>4}  {'images':>7}  classes"]
    for t, classes in enumerate(task.steps):
        names = ", ".join(f"{c}:{task.class_name(c)}" for c in classes)
        if len(names) > 90:
            names = f"{classes[0]}..{classes[-1]} ({task.class_name(classes[0])} .. " \
                    f"{task.class_name(classes[-1])})"
        images = f"{counts[t]:>7}" if counts is not None else f"{'-':>7}"
        lines.append(f"{t:>4}  {len(classes):>4}  {images}  {names}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 2 bad arguments or input)."""
    args = _parser().parse_args(argv)
    if args.list_file and not args.labels:
        print("error: --list needs --labels DIR", file=sys.stderr)
        return 2
    try:
        task = get_task(args.dataset, args.task, args.setting)
        counts = None
        if args.labels:
            paths = label_paths(args.labels, args.list_file)
            start = time.perf_counter()
            class_sets = scan_label_classes(paths, task.spec, workers=args.workers)
            counts = images_per_step(class_sets, task)
            print(f"read {len(paths)} label maps in {time.perf_counter() - start:.1f} s",
                  file=sys.stderr)
    except ConfigError as exc:
        flag = {"data.dataset": "--dataset", "task.name": "--task", "task.steps": "--task",
                "task": "--task", "task.setting": "--setting"}.get(exc.key, exc.key)
        print(f"error: {flag}: {exc.detail}", file=sys.stderr)
        return 2
    except (LabelFileError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = task.to_dict()
        if counts is not None:
            for step, n in zip(out["steps"], counts, strict=True):
                step["num_images"] = n
        print(json.dumps(out))
    else:
        print(format_task_table(task, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

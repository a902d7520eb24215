"""What the driver shows of a run's results: the console tables and the plots.

Every table is built from the steps' metrics.json dicts (`step`, `classes`, `miou_*`, `hiou`,
`per_class_iou`, `train_images`, `seconds`, `skipped_bad_samples`, `bad_samples`).
"""

from __future__ import annotations

from pathlib import Path

from icd_dist.css.classes import format_class_ids
from icd_dist.train.run_folder import METRICS, RunFolder

MAX_NAMED_BAD_SAMPLES = 20  # more are counted on the console and listed in metrics.json


def _pct(v: float | None) -> str:
    return "   -  " if v is None else f"{100 * v:6.2f}"


def format_summary_table(steps: list[dict]) -> str:
    """A console table of old/new/all mIoU and hIoU per step, the bad samples each step
    skipped (data.bad_samples=skip) and its time."""
    lines = [f"{'step':>4} {'classes':>9} {'images':>7} {'old':>6} {'new':>6} {'all':>6} "
             f"{'hIoU':>6} {'skipped':>7} {'time s':>7}"]
    for s in steps:
        lines.append(f"{s['step']:>4} {format_class_ids(s['classes']):>9} "
                     f"{s['train_images']:>7} {_pct(s['miou_old'])} {_pct(s['miou_new'])} "
                     f"{_pct(s['miou_all'])} {_pct(s['hiou'])} "
                     f"{s.get('skipped_bad_samples', 0):>7} {s['seconds']:>7.1f}")
    return "\n".join(lines)


def format_reading(steps: list[dict]) -> str:
    """What to look at in a finished schedule, in words: the old classes' mIoU after step 0
    and after the last step (stability: how much of it is kept), the new classes' mIoU
    (plasticity) and the hIoU that weighs both. Empty for a one-step run."""
    if len(steps) < 2 or steps[0]["miou_old"] is None or steps[-1]["miou_old"] is None:
        return ""
    first, last = steps[0]["miou_old"], steps[-1]["miou_old"]
    kept = f" ({100 * last / first:.0f}% of it kept)" if first > 0 else ""
    return (f"reading: old classes (stability) {100 * first:.2f} after step 0 -> "
            f"{100 * last:.2f} after step {steps[-1]['step']}{kept}; new classes "
            f"(plasticity) {_pct(steps[-1]['miou_new']).strip()}; hIoU "
            f"{_pct(steps[-1]['hiou']).strip()} weighs both. A method that forgets shows old "
            "far below step 0 (method.name=ft does); one that does not learn shows new near 0.")


def format_step_result(s: dict) -> str:
    """One line: a finished step's time and scores (%)."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"
    return (f"step {s['step']} done in {s['seconds']:.1f} s: mIoU (%) old {pct(s['miou_old'])}, "
            f"new {pct(s['miou_new'])}, all {pct(s['miou_all'])}, hIoU {pct(s['hiou'])}")


def format_class_table(steps: list[dict], num_old: int) -> str:
    """Per-class IoU (%) after each step so far, one column per step (the classes of the last
    step, old = the step-0 classes); '-' = not seen yet or no ground truth. Its lines differ
    from those of an earlier step's table (one more column)."""
    names = list(steps[-1]["per_class_iou"])
    width = max([len("class"), *(len(n) for n in names)])
    cols = [f"step {s['step']}" for s in steps]
    lines = [f"per-class IoU (%) after step {steps[-1]['step']}:",
             f"{'idx':>3}  {'class':<{width}}  {'group':<5}  " + "  ".join(
                 f"{c:>6}" for c in cols)]
    for i, name in enumerate(names):
        values = "  ".join(_pct(s["per_class_iou"].get(name)) for s in steps)
        lines.append(f"{i:>3}  {name:<{width}}  {'old' if i < num_old else 'new':<5}  {values}")
    return "\n".join(lines)


def format_bad_samples(s: dict) -> list[str]:
    """Lines naming each distinct bad sample a step skipped (none if it skipped none)."""
    bad = s.get("bad_samples") or []
    if not bad:
        return []
    lines = [f"step {s['step']}: skipped {len(bad)} bad sample{'s' if len(bad) != 1 else ''} "
             "(data.bad_samples=skip):"]
    for b in bad[:MAX_NAMED_BAD_SAMPLES]:
        lines.append(f"  shard {b['shard']}, sample {b['key']!r}: {b['reason']}")
    if len(bad) > MAX_NAMED_BAD_SAMPLES:
        lines.append(f"  ... and {len(bad) - MAX_NAMED_BAD_SAMPLES} more, listed in "
                     f"{RunFolder.step_dir(s['step'])}/{METRICS}")
    return lines


def write_plots(steps: list[dict], folder: Path, run_name: str = "") -> list[Path]:
    """mIoU per step and the last step's per-class IoU (old and new classes in two colours),
    as PNGs in `folder`, titled with the run's name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    prefix = f"{run_name}: " if run_name else ""
    xs = [s["step"] for s in steps]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("miou_old", "old"), ("miou_new", "new"), ("miou_all", "all")):
        ys = [100 * s[key] if s[key] is not None else float("nan") for s in steps]
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("mIoU (%)")
    ax.set_xticks(xs)
    ax.set_title(f"{prefix}mIoU after each step", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    miou = folder / "miou_per_step.png"
    fig.tight_layout()
    fig.savefig(miou, dpi=100)
    plt.close(fig)

    per_class = steps[-1]["per_class_iou"]
    names = list(per_class)
    num_old = len(steps[0]["classes"])
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(per_class)), 4))
    for group, idx, colour in (("old", range(min(num_old, len(names))), "tab:blue"),
                               ("new", range(num_old, len(names)), "tab:orange")):
        if len(idx):
            ax.bar(list(idx), [100 * (per_class[names[i]] or 0.0) for i in idx],
                   color=colour, label=f"{group} classes")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("IoU (%)")
    ax.set_title(f"{prefix}per-class IoU after step {steps[-1]['step']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    bars = folder / "per_class_iou.png"
    fig.savefig(bars, dpi=100)
    plt.close(fig)
    return [miou, bars]

"""Training-step throughput and teacher memory on this machine (CPU, local Ray).

Table 1: images/s of forward + backward + optimiser step on the same model and global
batch, for plain single-process torch and for 1 and 2 Ray Train workers with DeepSpeed
(ZeRO-1) and DDP; the ratios to plain torch are the overhead of Ray + the engine.
Table 2: the memory a worker spends on the frozen teacher when it is shared through the Ray
object store (zero-copy) and when every worker loads its own copy.

    python tools/bench_train.py [--backbone resnet18] [--crop 128] [--batch 8] [--iters 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import cpu_name  # noqa: E402

from icd_dist.config import load_config  # noqa: E402
from icd_dist.models.deeplab import build_model  # noqa: E402
from icd_dist.train.bench_loop import (  # noqa: E402
    teacher_memory_worker,
    throughput_worker,
    time_training,
)
from icd_dist.train.teacher_share import put_teacher  # noqa: E402


def fit(loop, workers: int, config: dict, storage: str) -> None:
    """Run `loop` on `workers` CPU Ray Train workers."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    TorchTrainer(loop, train_loop_config=config,
                 scaling_config=ScalingConfig(num_workers=workers, use_gpu=False,
                                              resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(storage_path=storage)).fit()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--iters", type=int, default=8, help="timed optimiser steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--teacher-backbone", default="resnet101",
                   help="model whose memory table 2 measures")
    p.add_argument("--out", default="bench_train.json")
    args = p.parse_args()
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    base = ["data.synthetic.classes=8", f"data.crop_size={args.crop}",
            f"model.backbone={args.backbone}", "model.head_channels=128",
            "model.norm=groupnorm", f"optim.batch_size={args.batch}"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg1 = load_config(None, [*base, "engine.num_workers=1", "engine.zero_stage=0",
                                  "engine.engine=ddp"])
        torch.set_num_threads(1)  # each Ray worker gets one core: compare like with like
        plain = time_training(cfg1, args.iters, args.warmup, None)
        rows.append({"setup": "plain torch, 1 process", "workers": 1, "images_per_s": plain})
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
        try:
            for workers in (1, 2):
                for engine in ("ddp", "deepspeed"):
                    stage = 1 if engine == "deepspeed" else 0
                    cfg = load_config(None, [*base, f"engine.num_workers={workers}",
                                             f"engine.engine={engine}",
                                             f"engine.zero_stage={stage}"])
                    out = Path(tmp) / f"{engine}{workers}.json"
                    fit(throughput_worker, workers, {"cfg": cfg, "iterations": args.iters,
                                                     "warmup": args.warmup, "engine": engine,
                                                     "out": str(out)}, tmp)
                    rate = json.loads(out.read_text())["images_per_s"]
                    name = "DeepSpeed ZeRO-1" if engine == "deepspeed" else "DDP"
                    rows.append({"setup": f"Ray Train + {name}", "workers": workers,
                                 "images_per_s": rate})
            mem_cfg = load_config(None, [*base, f"model.backbone={args.teacher_backbone}",
                                         "engine.num_workers=2"])
            model = build_model(mem_cfg.model, [8])
            teacher_file = Path(tmp) / "teacher.pt"
            torch.save(model.state_dict(), teacher_file)
            size_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) \
                / 2**20
            ref = put_teacher(model.state_dict())
            memory = {}
            for shared in (True, False):
                out = Path(tmp) / f"mem{shared}.json"
                fit(teacher_memory_worker, 2, {"cfg": mem_cfg, "shared": shared, "teacher": ref,
                                               "teacher_file": str(teacher_file),
                                               "out": str(out)}, tmp)
                memory["shared" if shared else "private"] = json.loads(out.read_text())
        finally:
            ray.shutdown()
    device = f"CPU: {cpu_name()}, {os.cpu_count()} cores"
    print(f"training step, {args.backbone} DeepLabV3, crop {args.crop}, global batch "
          f"{args.batch}, {args.iters} timed steps ({device}; 1 core per worker)")
    print(f"{'setup':<28} {'workers':>7} {'img/s':>8} {'vs plain':>9}")
    for r in rows:
        r["ratio_to_plain"] = r["images_per_s"] / plain
        print(f"{r['setup']:<28} {r['workers']:>7} {r['images_per_s']:>8.2f} "
              f"{r['ratio_to_plain']:>9.2f}")
    print(f"\nteacher memory per worker, {args.teacher_backbone} ({size_mb:.0f} MB of weights),"
          " 2 workers")
    print(f"{'teacher':<34} {'private (USS) MB':>17} {'proportional (PSS) MB':>22}")
    for kind, label in (("shared", "shared via the object store"),
                        ("private", "private copy per worker")):
        for rank, m in enumerate(memory[kind]):
            print(f"{label + f' (rank {rank})':<34} {m['uss_mb']:>17.1f} {m['pss_mb']:>22.1f}")
    versions = {"torch": torch.__version__, "ray": ray.__version__,
                "deepspeed": __import__("deepspeed").__version__,
                "python": sys.version.split()[0]}
    print(", ".join(f"{k} {v}" for k, v in versions.items()))
    Path(args.out).write_text(json.dumps({"device": device, "versions": versions,
                                          "args": vars(args), "throughput": rows,
                                          "teacher_weights_mb": size_mb,
                                          "teacher_memory": memory}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

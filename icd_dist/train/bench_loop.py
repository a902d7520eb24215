"""Worker loops of tools/bench_train.py (importable, so Ray can ship them to its workers):
training-step throughput of an engine, and the memory a worker spends on the teacher."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from icd_dist.config import Config, micro_batch_and_accumulation
from icd_dist.models.deeplab import build_model
from icd_dist.train.engine import build_engine
from icd_dist.train.step_worker import rank_and_world


def time_training(cfg: Config, iterations: int, warmup: int, engine_name: str | None) -> float:
    """Images/s (over all workers) of forward + backward + optimiser step on random data of
    the configured crop, micro-batch and model; engine None = plain single-process torch."""
    torch.manual_seed(0)
    model = build_model(cfg.model, [cfg.data.synthetic.classes])
    micro, accumulation = micro_batch_and_accumulation(cfg)
    crop = cfg.data.crop_size
    x = torch.randn(micro, 3, crop, crop)
    y = torch.randint(0, cfg.data.synthetic.classes, (micro, crop, crop))
    if engine_name is None:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def one_step():
            for _ in range(accumulation):
                loss = torch.nn.functional.cross_entropy(model(x).logits, y) / accumulation
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        engine = build_engine(cfg, model, list(model.parameters()), 0.01,
                              iterations + warmup, on_gpu=False)

        def one_step():
            for _ in range(accumulation):
                loss = torch.nn.functional.cross_entropy(engine.forward(x).logits, y)
                engine.backward(loss)
                engine.end_micro_batch()
    for _ in range(warmup):
        one_step()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        one_step()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return cfg.optim.batch_size * iterations / (time.perf_counter() - start)


def throughput_worker(config: dict) -> None:
    """Ray Train loop: time training and let rank 0 write {"images_per_s"} to config["out"]."""
    rate = time_training(config["cfg"], config["iterations"], config["warmup"],
                         config["engine"])
    if rank_and_world()[0] == 0:
        Path(config["out"]).write_text(json.dumps({"images_per_s": rate}))


def teacher_memory_worker(config: dict) -> None:
    """Ray Train loop: the worker's private (USS) and proportional (PSS) memory growth from
    building the teacher, shared through the object store or loaded as a private copy."""
    from icd_dist.train.teacher_share import build_teacher, fetch_teacher_arrays

    proc = psutil.Process()
    before = proc.memory_full_info()
    cfg: Config = config["cfg"]
    if config["shared"]:
        teacher = build_teacher(fetch_teacher_arrays(config["teacher"]), cfg.model,
                                [cfg.data.synthetic.classes], torch.device("cpu"))
    else:
        state = torch.load(config["teacher_file"], map_location="cpu", weights_only=True)
        teacher = build_model(cfg.model, [cfg.data.synthetic.classes])
        teacher.load_state_dict(state)
        del state
    with torch.no_grad():
        teacher(torch.randn(1, 3, 64, 64))  # touch the weights
    after = proc.memory_full_info()
    out = {"uss_mb": (after.uss - before.uss) / 2**20, "pss_mb": (after.pss - before.pss) / 2**20}
    gathered: list = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(gathered, out)
    else:
        gathered = [out]
    if rank_and_world()[0] == 0:
        Path(config["out"]).write_text(json.dumps(gathered))

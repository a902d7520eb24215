"""The per-worker training engine: DeepSpeed (ZeRO 0/1/2, fp32/bf16/fp16) or plain DDP,
with the protocol's SGD (or AdamW) and a poly schedule stepped per iteration (optimiser update), and
gradient accumulation so that the global batch is optim.batch_size.

Both engines expose the same small interface (forward, backward, end_micro_batch, autocast, module,
save/load), and on the same seed give the same loss curve in fp32 and in bf16 (tested).

bf16 means the same in both engines: autocast to bfloat16 around the forward, with fp32
weights (the master weights: what the optimiser updates, what model.pt holds and what the next
step starts from), fp32 gradients and all-reduce, normalisation layers with fp32 weights and
statistics (their kernels accumulate in fp32). DDP wraps its forward in torch.autocast.
DeepSpeed gets it through its own `torch_autocast` config section (every module's gradients
reduced in fp32: `lower_precision_safe_modules: []`): an outer torch.autocast does not work
there, because DeepSpeed's forward (runtime/torch_autocast.py) sees it enabled while its own
section is off and re-enters `torch.autocast(enabled=False)`. On CUDA the no-argument
`torch.is_autocast_enabled()` answers for the GPU, so a GPU run trained in fp32 while saying
bf16 (on CPU it answers for CUDA, so CPU runs never showed it; tests force the CUDA answer).
DeepSpeed's own bf16 mode (a bf16 module with fp32 copies in the optimiser) is not used. It
runs on CPU too. fp16 is DeepSpeed's fp16 mode (an fp16 module, dynamic loss scaling) or
autocast with a GradScaler on DDP, GPU only; an iteration skipped for an overflow does not
advance the poly schedule in either engine. `autocast()` is the same context for other
forwards of the step (the teacher's).

DeepSpeed's accelerator is set in the worker from the device it trains on (DS_ACCELERATOR
cuda or cpu, checked after initialize: the student's parameters are on that device), and its
device is Ray's (`device_rank`), not LOCAL_RANK, so fractional GPUs per worker place right. On
CPU it runs on the gloo group Ray Train made; its shared-memory all-reduce op (JIT-compiled on
every initialize) is marked incompatible so that it falls back to gloo instead of building for a
minute.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from icd_dist.config import Config, micro_batch_and_accumulation


def poly_lambda(total_iterations: int, power: float):
    """Multiplier of the base lr at iteration i: (1 - i / total) ** power, floored at 0."""
    def factor(i: int) -> float:
        return max(0.0, 1.0 - i / max(1, total_iterations)) ** power
    return factor


# Mixed-precision dtypes by config name; fp32 (None) means no casting.
PRECISION_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(cfg: Config, on_gpu: bool) -> str:
    """fp32 / bf16 / fp16 for this worker: `auto` is bf16 on GPUs that support it, else fp32;
    bf16 also runs on CPU, fp16 needs a GPU."""
    p = cfg.engine.precision
    if p == "auto":
        return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    if p == "fp16" and not on_gpu:
        raise ValueError("engine.precision=fp16 needs a GPU; use bf16, fp32 or auto on CPU")
    return p


def autocast(device_type: str, precision: str):
    """The forward's mixed-precision context: autocast to bf16/fp16, none for fp32."""
    dtype = PRECISION_DTYPES[precision]
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()


# ZeRO's reduce and all-gather buckets in elements: a few buckets for a ~60M-parameter
# DeepLabV3-ResNet-101 so that communication overlaps the backward (DeepSpeed's 5e8 default
# makes the whole model one bucket).
DEEPSPEED_BUCKET_ELEMENTS = 25_000_000


def deepspeed_config(cfg: Config, precision: str) -> dict:
    """The DeepSpeed config of a worker: batch and accumulation, ZeRO stage and buckets, no
    gradient clipping, fp16 mode or bf16 through DeepSpeed's torch_autocast section."""
    micro, accumulation = micro_batch_and_accumulation(cfg)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": cfg.optim.batch_size,
        "zero_optimization": {"stage": cfg.engine.zero_stage,
                              "reduce_bucket_size": DEEPSPEED_BUCKET_ELEMENTS,
                              "allgather_bucket_size": DEEPSPEED_BUCKET_ELEMENTS},
        "zero_allow_untested_optimizer": True,
        # the protocol does not clip gradients (DeepSpeed would clip at its default norm)
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        # bf16: autocast over the fp32 module, every gradient reduced in fp32
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16",
                           "lower_precision_safe_modules": []},
    }


def set_deepspeed_accelerator(on_gpu: bool) -> None:
    """DeepSpeed's accelerator for this worker: cuda on a GPU worker, cpu otherwise (set
    before DeepSpeed first picks one); RuntimeError if DeepSpeed already picked another."""
    want = "cuda" if on_gpu else "cpu"
    os.environ["DS_ACCELERATOR"] = want
    from deepspeed.accelerator import get_accelerator

    got = get_accelerator().device_name()
    if got != want:
        raise RuntimeError(f"DeepSpeed's accelerator in this worker is {got!r}, but the worker "
                           f"trains on {want}: something imported DeepSpeed's accelerator "
                           "before the engine set DS_ACCELERATOR")


def build_optimizer(cfg: Config, params, lr: float) -> torch.optim.Optimizer:
    """The configured optimiser over `params` with base learning rate `lr`."""
    o = cfg.optim
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay)


class TrainEngine:
    """What the step loop needs from an engine."""

    module: nn.Module
    accumulation: int
    input_dtype: torch.dtype = torch.float32  # what forward() expects its images in
    precision: str = "fp32"  # resolved: fp32, bf16 or fp16
    device_type: str = "cpu"

    def forward(self, *args, **kwargs):
        """The model's forward."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of `loss` (one micro-batch)."""
        raise NotImplementedError

    def end_micro_batch(self) -> bool:
        """End of a micro-batch: at an accumulation boundary, an iteration (optimiser + lr
        update). Returns whether an iteration was applied (not at other micro-batches, nor
        when fp16 loss scaling skipped it for an overflow; only applied iterations advance
        the schedule). "Step" is the task's incremental step throughout train/."""
        raise NotImplementedError

    def lr(self) -> float:
        """The current learning rate."""
        raise NotImplementedError

    def autocast(self):
        """The mixed-precision context of the student's forward, for other forwards of the
        step (the teacher's): autocast to bf16/fp16, none for fp32."""
        return autocast(self.device_type, self.precision)

    def save(self, folder: str | Path) -> None:
        """Write this rank's part of the engine state (weights, optimiser, schedule)."""
        raise NotImplementedError

    def load(self, folder: str | Path) -> None:
        """Restore what save() wrote."""
        raise NotImplementedError


class DeepSpeedTrainEngine(TrainEngine):
    """deepspeed.initialize around the model with a torch optimiser and LambdaLR schedule."""

    def __init__(self, cfg: Config, model: nn.Module, params, lr: float, total_iterations: int,
                 on_gpu: bool):
        set_deepspeed_accelerator(on_gpu)
        import deepspeed
        import deepspeed.ops

        if not on_gpu:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        _, accumulation = micro_batch_and_accumulation(cfg)
        precision = resolve_precision(cfg, on_gpu)
        optimizer = build_optimizer(cfg, params, lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, poly_lambda(total_iterations, cfg.optim.poly_power))
        device = next(model.parameters()).device
        # GPU: Ray's device for this worker (DeepSpeed would take LOCAL_RANK's, wrong for a
        # fraction of a GPU per worker); CPU: DeepSpeed's LOCAL_RANK path (a negative
        # device_rank would make it a world of one)
        args = SimpleNamespace(device_rank=device.index or 0) if device.type == "cuda" else None
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            args=args, model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, precision), dist_init_required=False)
        self.module = self.engine.module
        self.accumulation = accumulation
        self.precision = precision
        self.device_type = "cuda" if on_gpu else "cpu"
        placed = next(self.module.parameters()).device
        if placed.type != self.device_type:
            raise RuntimeError(f"DeepSpeed put the student on {placed}, the worker trains on "
                               f"{self.device_type} (DS_ACCELERATOR="
                               f"{os.environ.get('DS_ACCELERATOR')!r})")
        # DeepSpeed's fp16 mode keeps fp16 weights: the images must come in that dtype
        self.input_dtype = torch.float16 if precision == "fp16" else torch.float32

    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)  # bf16: DeepSpeed's own torch_autocast section

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def end_micro_batch(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary and self.engine.was_step_applied()

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, folder: str | Path) -> None:
        self.engine.save_checkpoint(str(folder), tag="engine")

    def load(self, folder: str | Path) -> None:
        # DeepSpeed's own loader unpickles with weights_only=False; read with
        # weights_only=True instead, allowing only DeepSpeed's plain-data records.
        self.engine.checkpoint_engine.load = _weights_only_load
        self.engine.load_checkpoint(str(folder), tag="engine")


def _weights_only_load(path: str, map_location=None):
    # The plain-data classes DeepSpeed's ZeRO checkpoints hold besides tensors.
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum,
                                           fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


class DDPTrainEngine(TrainEngine):
    """torch DistributedDataParallel with no_sync during accumulation and the same loss
    scaling as DeepSpeed (loss / accumulation); bf16 by autocast, fp16 with a GradScaler."""

    def __init__(self, cfg: Config, model: nn.Module, params, lr: float, total_iterations: int,
                 on_gpu: bool):
        import torch.distributed as dist

        _, self.accumulation = micro_batch_and_accumulation(cfg)
        self.precision = resolve_precision(cfg, on_gpu)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            device_ids = [torch.cuda.current_device()] if on_gpu else None
            self.wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        else:
            self.wrapped = model
        self.module = model
        self.optimizer = build_optimizer(cfg, params, lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, poly_lambda(total_iterations, cfg.optim.poly_power))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.micro_batch = 0
        self.device_type = "cuda" if on_gpu else "cpu"

    def forward(self, *args, **kwargs):
        # DDP decides in forward whether the coming backward all-reduces: skip it on
        # micro-batches before the accumulation boundary.
        sync = (self.micro_batch + 1) % self.accumulation == 0
        no_sync = not sync and isinstance(self.wrapped, nn.parallel.DistributedDataParallel)
        with self.wrapped.no_sync() if no_sync else nullcontext(), \
                autocast(self.device_type, self.precision):
            return self.wrapped(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.accumulation).backward()

    def end_micro_batch(self) -> bool:
        self.micro_batch += 1
        if self.micro_batch % self.accumulation:
            return False
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # GradScaler skips the iteration on inf/nan gradients and lowers its scale
        applied = scale is None or self.scaler.get_scale() >= scale
        if applied:
            self.scheduler.step()
        return applied

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, folder: str | Path) -> None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank == 0:
            torch.save({"model": self.module.state_dict(), "optimizer":
                        self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict(), "micro_batch": self.micro_batch},
                       Path(folder) / "ddp_engine.pt")

    def load(self, folder: str | Path) -> None:
        state = torch.load(Path(folder) / "ddp_engine.pt", map_location="cpu",
                           weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        # "micro_step": a checkpoint written before the iteration/step naming
        self.micro_batch = state.get("micro_batch", state.get("micro_step"))


def build_engine(cfg: Config, model: nn.Module, params, lr: float, total_iterations: int,
                 on_gpu: bool) -> TrainEngine:
    """The engine that cfg.engine.engine names."""
    cls = DeepSpeedTrainEngine if cfg.engine.engine == "deepspeed" else DDPTrainEngine
    return cls(cfg, model, params, lr, total_iterations, on_gpu)

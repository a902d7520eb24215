"""The training of one incremental step on one Ray Train worker: a StepTrainer.

StepTrainer(job).fit() reads top-down: build the method, the student (the shared teacher's
weights plus the new classifier head, or from scratch at step 0), the frozen teacher, the
engine and this rank's loaders; resume from the latest epoch checkpoint if there is one; then
epoch by epoch train_epoch, the optional evaluation, save (the engine's state and every rank's
RNG and counters: checkpoint.py); last, evaluate (validation.py, the code `icd_dist.evaluate`
runs too) and write_results: rank 0 writes the fp32 model.pt (the master weights),
metrics.json and, last, the step's DONE marker.

Naming: a "step" is the task's incremental step (step 0, step 1, ...); an "iteration" is
one optimiser update (a global batch, over micro-batches with gradient accumulation).

The budget (StepBudget) is fixed before training: every epoch is the same whole number of
iterations on every rank (data/epoch_order.py), the poly schedule runs over `iterations`
applied iterations. Resuming after epoch k restores the engine (weights, optimiser, lr
schedule, applied-iteration count), every rank's torch/numpy/python (and CUDA) RNG states and the
counters, and the loaders read epoch k + 1 as they would have (their order and augmentation
are functions of (seed, epoch, rank)): a resumed step ends with the weights of the
uninterrupted one, bit for bit on CPU (tested for both engines).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from icd_dist.config import Config, config_to_dict, micro_batch_and_accumulation
from icd_dist.css.remap import train_lut
from icd_dist.data.epoch_order import micro_batches_per_epoch
from icd_dist.data.pipeline import StepLoader
from icd_dist.methods import Method, build_method, inference_state
from icd_dist.models.deeplab import DeepLabV3, build_model, to_sync_batchnorm
from icd_dist.train.checkpoint import EpochCheckpoints, TrainState, set_rng_states
from icd_dist.train.engine import PRECISION_DTYPES, TrainEngine, build_engine
from icd_dist.train.metrics import StepMetrics
from icd_dist.train.plan import SchedulePlan, StepJob
from icd_dist.train.progress import ProgressWriter
from icd_dist.train.run_folder import RunFolder
from icd_dist.train.teacher_share import (
    TeacherHandoff,
    build_teacher,
    fetch_teacher_arrays,
    shared_tensors,
    shares_memory_with,
)
from icd_dist.train.tracking import Tracker, wandb_mode
from icd_dist.train.validation import eval_loader, note_bad_samples, validate


@dataclass(frozen=True)
class StepBudget:
    """A step's training budget, fixed before it starts (the same on every rank)."""

    micro: int  # samples per micro-batch per worker
    accumulation: int  # micro-batches per iteration
    batches_per_epoch: int  # micro-batches per worker per epoch (whole iterations)
    epochs: int
    iterations: int  # iterations of the step (the poly schedule's length)

    @classmethod
    def of(cls, cfg: Config, step: int, num_images: int) -> StepBudget:
        """The budget of `step` with `num_images` selected training images: an epoch reads
        every image at least once (epoch_order); optim.iterations[_incremental], when set,
        replace the epoch budget with that many iterations (the last epoch cut short)."""
        micro, accumulation = micro_batch_and_accumulation(cfg)
        per_epoch = micro_batches_per_epoch(num_images, cfg.engine.num_workers, micro,
                                            accumulation)
        o = cfg.optim
        iterations = o.iterations if step == 0 else (o.iterations_incremental or o.iterations)
        if iterations:
            epochs = math.ceil(iterations * accumulation / per_epoch)
        else:
            epochs = o.epochs if step == 0 else (o.epochs_incremental or o.epochs)
            iterations = per_epoch * epochs // accumulation
        return cls(micro, accumulation, per_epoch, epochs, iterations)


def dtype_name(t: torch.Tensor | None) -> str | None:
    """"float32", "bfloat16", ... of a tensor (None without one)."""
    return None if t is None else str(t.dtype).split(".")[-1]


def observed_dtypes(student, teacher=None) -> dict:
    """The dtypes a forward actually produced: the student's five taps and logits, the
    teacher's logits (None without a teacher)."""
    return {"taps": [dtype_name(f) for f in student.features],
            "logits": dtype_name(student.logits),
            "teacher_logits": dtype_name(teacher.logits) if teacher is not None else None}


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sees_gpu(cfg: Config) -> bool:
    """Whether this process trains on a GPU: it sees CUDA and engine.device is not cpu."""
    return torch.cuda.is_available() and cfg.engine.device != "cpu"


def _device(cfg: Config, launcher: str) -> torch.device:
    """The worker's device: Ray's GPU for this worker, the first GPU in-process (unless
    engine.device=cpu), else the CPU."""
    if not sees_gpu(cfg):
        return torch.device("cpu")
    if launcher == "local":
        return torch.device("cuda", 0)
    import ray.train.torch

    return ray.train.torch.get_device()


def _teacher_dtype(cfg: Config) -> torch.dtype | None:
    """The teacher's weight dtype (None: fp32, as its authors keep it under AMP)."""
    return PRECISION_DTYPES[cfg.engine.teacher_dtype]


def build_student(job: StepJob, device: torch.device, method: Method) -> DeepLabV3:
    """Step 0: a fresh model (pretrained backbone if configured), the same on every rank
    (seeded). Step t > 0: the teacher's weights plus a new head, initialised as the method
    says (random for ft, MiB's for the others), the same on every rank (seeded)."""
    cfg, task, step = job.cfg, job.task, job.step
    sizes = [len(s) for s in task.steps[: step + 1]]
    torch.manual_seed(cfg.run.seed)
    if step > 0:
        arrays = fetch_teacher_arrays(job.teacher)
        model = build_model(cfg.model, sizes[:-1], load_pretrained=False)
        method.init_student(model, shared_tensors(arrays))  # load_state_dict copies once
    else:
        model = build_model(cfg.model, sizes)
    if device.type == "cuda" and cfg.engine.num_workers > 1 and cfg.model.norm == "batchnorm":
        model = to_sync_batchnorm(model)
    model = model.to(device)
    if cfg.engine.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _maybe_inject_failure(job: StepJob, epoch: int, rank: int) -> None:
    """The test hook FAILURE_ENV ("step:epoch:rank", or "step:epoch:rank:hold"): once per run,
    the rank exits at the start of that epoch, or (hold) writes its Ray node id into the
    marker and waits there until its process is killed (a test removes its node)."""
    spec = job.inject_failure
    if not spec or not job.failure_marker_dir:
        return
    step, ep, rk, *mode = spec.split(":")
    marker = Path(job.failure_marker_dir) / f"failed_{step}_{ep}_{rk}"
    if (int(step), int(ep), int(rk)) == (job.step, epoch, rank) and not marker.exists():
        import ray

        marker.parent.mkdir(parents=True, exist_ok=True)
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        partial = marker.with_suffix(".partial")
        partial.write_text(node or "injected")
        partial.replace(marker)  # the marker appears whole
        while mode == ["hold"]:
            time.sleep(1)
        os._exit(1)


class StepTrainer:
    """One step of a schedule on one worker (see the module docstring)."""

    def __init__(self, job: StepJob, report: Callable[[dict], None] | None = None):
        cfg, task, step = job.cfg, job.task, job.step
        self.job, self.cfg, self.task, self.step = job, cfg, task, step
        self.report = report or (lambda metrics: None)  # Ray Train's report per epoch
        self.final_state: dict | None = None  # rank 0, after write_results: model.pt's weights
        self.rank, self.world = rank_and_world()
        self.device = _device(cfg, job.launcher)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed crop sizes: pick the fastest kernels
        self.memory_format = torch.channels_last if cfg.engine.channels_last \
            else torch.contiguous_format
        self.is_chief = self.rank == 0
        self.run = RunFolder(job.run_uri)
        self.checkpoints = EpochCheckpoints(self.run, step)
        self.budget = StepBudget.of(cfg, step, len(job.train_keys))
        self.method = build_method(cfg, task, step).to(self.device)
        self.student = build_student(job, self.device, self.method)
        self.teacher = self._build_teacher()
        params = [p for p in (*self.student.parameters(), *self.method.parameters())
                  if p.requires_grad]
        lr = cfg.optim.lr if step == 0 else cfg.optim.lr_incremental
        params = self.method.param_groups(self.student, params, lr)  # DKD: lr x10 on the head
        self.engine: TrainEngine = build_engine(cfg, self.student, params, lr,
                                                self.budget.iterations,
                                                self.device.type == "cuda")
        # Engines consume different amounts of randomness while initialising: reseed so that
        # dropout is the same whatever the engine (and differs between ranks).
        torch.manual_seed(cfg.run.seed * 100_003 + step * 1_009 + self.rank)
        self.train_loader, self.eval_loader = self._build_loaders()
        self.state = TrainState()
        self.start_epoch = 0
        self._seen, self._t0 = 0, time.perf_counter()
        self._pending_losses: list[torch.Tensor] = []  # rank 0: not yet in the loss curve
        self.progress = ProgressWriter(self.run.storage, self.run.progress(step)) \
            if self.is_chief else None
        self.tracker = Tracker(self.is_chief, wandb_mode(cfg.logging.wandb),
                               self.run.local_step_dir(step, job.run_name),
                               cfg.logging.project, cfg.logging.entity,
                               cfg.logging.group or job.run_name, f"{job.run_name}-step{step}",
                               {**config_to_dict(cfg), "step": step})

    def _build_teacher(self) -> torch.nn.Module | None:
        if not self.method.needs_teacher:
            return None
        sizes = [len(s) for s in self.task.steps[: self.step]]
        self._teacher_arrays = inference_state(fetch_teacher_arrays(self.job.teacher))
        teacher = build_teacher(self._teacher_arrays, self.cfg.model, sizes, self.device,
                                _teacher_dtype(self.cfg))
        if self.cfg.engine.channels_last and self.device.type == "cuda":
            teacher = teacher.to(memory_format=torch.channels_last)  # a copy on GPU anyway
        return teacher

    def _placement(self) -> dict:
        """Where the ranks ran and how the teacher reached them, as observed (a collective:
        every rank calls it): each rank's Ray node ("worker_nodes"; null in-process), whether
        its teacher's weights are the shared arrays themselves ("teacher_zero_copy": no
        private copy; null without a teacher), and on rank 0 the nodes whose object store
        holds the teacher's arrays ("teacher_nodes": one copy per node with workers)."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        zero_copy = shares_memory_with(self.teacher, self._teacher_arrays) \
            if self.teacher is not None else None
        out = {"worker_nodes": _gather_objects(node, self.world),
               "teacher_zero_copy": _gather_objects(zero_copy, self.world),
               "teacher_nodes": None}
        if self.is_chief and isinstance(self.job.teacher, ray.ObjectRef):
            from ray.experimental import get_object_locations

            where = get_object_locations([self.job.teacher])[self.job.teacher]
            out["teacher_nodes"] = sorted(where["node_ids"])
        return out

    def _build_loaders(self) -> tuple[StepLoader, StepLoader]:
        cfg, job, task, step = self.cfg, self.job, self.task, self.step
        device_id = self.device.index if self.device.type == "cuda" else None
        common = {"rank": self.rank, "world_size": self.world, "device_id": device_id,
                  "num_threads": cfg.engine.dali_threads}
        train = StepLoader(cfg.data, job.train_shards, job.train_keys,
                           train_lut(task, step, cfg.data.ignore_background), True,
                           self.budget.micro, seed=cfg.run.seed + step,
                           batches_per_epoch=self.budget.batches_per_epoch, **common)
        evaluation = eval_loader(cfg, task, step, job.eval_shards, job.eval_keys,
                                 self.rank, self.world, device_id)
        return train, evaluation

    def fit(self) -> None:
        """The whole step: resume, prepare the method, train every epoch, write results."""
        rng = self.restore()
        self.method.prepare(self.teacher, self._data_pass)
        if rng is not None:  # after prepare(), whose pass draws from the global RNG
            set_rng_states(rng)
        b = self.budget
        for epoch in range(self.start_epoch, b.epochs):
            _maybe_inject_failure(self.job, epoch, self.rank)
            started = time.perf_counter()
            last = self.train_epoch(epoch)
            self.state.seconds += time.perf_counter() - started
            every = self.cfg.eval.every_n_epochs
            if every and (epoch + 1) % every == 0 and epoch + 1 < b.epochs:
                m, _ = self.evaluate()
                self.tracker.log({f"eval/{k}": v for k, v in m.scalars().items()},
                                 at=self.state.iteration)
            self.save(epoch)
            self.report({"step": self.step, "epoch": epoch,
                         "loss": float(last.get("total", 0.0))})
        self.write_results()

    def train_epoch(self, epoch: int) -> dict[str, torch.Tensor]:
        """One epoch (the budget's micro-batches; the last epoch stops at the iteration
        budget); returns the last micro-batch's loss components."""
        self.student.train()
        self.method.set_train_mode(self.student)  # e.g. DKD's frozen BatchNorm and dropout
        self.train_loader.set_epoch(epoch)
        self._seen, self._t0, last = 0, time.perf_counter(), {}
        for batch in self.train_loader:
            if self.state.iteration >= self.budget.iterations:
                break
            last = self.train_micro_batch(batch, epoch)
        self.flush_losses()
        if self.progress is not None:
            # .4g: small terms (e.g. the external ICD loss) do not print as 0.0000
            loss_text = ", ".join(f"{k} {float(v):.4g}" for k, v in last.items())
            self.progress.write(f"step {self.step} epoch {epoch + 1}/{self.budget.epochs}: "
                                f"{loss_text} ({self._images_per_s():.1f} img/s)")
        return last

    def train_micro_batch(self, batch, epoch: int) -> dict[str, torch.Tensor]:
        """Forward, backward and (at accumulation boundaries) the iteration of one
        micro-batch; returns its loss components (on the device: they are read back to the
        host every logging.log_every iterations, not every iteration)."""
        st = self.state
        note_bad_samples(st.bad, batch)
        st.bad_reads += batch.skipped
        st.micro_batches += 1
        self._seen += batch.images.shape[0]
        images = batch.images.to(self.device, non_blocking=True) \
            .contiguous(memory_format=self.memory_format)
        labels = batch.labels.to(self.device, non_blocking=True)
        teacher_out = None
        if self.teacher is not None:
            # the teacher runs under the student's autocast (fp32 weights by default)
            with torch.no_grad(), self.engine.autocast():
                teacher_out = self.teacher(images.to(next(self.teacher.parameters()).dtype))
        student_out = self.engine.forward(images.to(self.engine.input_dtype))
        if not st.observed_dtypes:
            st.observed_dtypes = observed_dtypes(student_out, teacher_out)
        loss, parts = self.method(student_out, teacher_out, labels)
        self.engine.backward(loss)
        if self.engine.end_micro_batch():
            st.iteration += 1
            if self.is_chief:
                self._pending_losses.append(parts["total"])
                if st.iteration % self.cfg.logging.log_every == 0:
                    self.flush_losses()
                    self.tracker.log({**{f"loss/{k}": float(v) for k, v in parts.items()},
                                      "lr": self.engine.lr(), "epoch": epoch,
                                      "images_per_s": self._images_per_s()},
                                     at=st.iteration)
        return parts

    def flush_losses(self) -> None:
        """Append the losses of the iterations since the last flush to the loss curve
        (one device-to-host copy for all of them)."""
        if self._pending_losses:
            self.state.loss_curve.extend(torch.stack(self._pending_losses).float().tolist())
            self._pending_losses = []

    def _images_per_s(self) -> float:
        """Training images per second of every rank together, this epoch so far."""
        return self._seen * self.world / max(1e-9, time.perf_counter() - self._t0)

    def _data_pass(self):
        """One pass over the step's training data for the method's preparation (its own
        epoch number, so it reuses no training epoch's augmentation)."""
        self.train_loader.set_epoch(10**6)
        for batch in self.train_loader:
            yield (batch.images.to(self.device, non_blocking=True),
                   batch.labels.to(self.device))

    def evaluate(self, overlays: int = 0) -> tuple[StepMetrics, list]:
        """The student's metrics on the step's evaluation data (every rank's images) and up
        to `overlays` of this rank's (image, prediction, ground truth)."""
        return validate(self.engine.module, self.eval_loader, self.task, self.step,
                        self.device, overlays, bad=self.state.bad)

    def save(self, epoch: int) -> None:
        """Epoch checkpoint of every rank (checkpoint.EpochCheckpoints.save)."""
        self.checkpoints.save(epoch, self.engine, self.state, self.rank, self.world)

    def restore(self) -> dict | None:
        """Load the latest complete epoch checkpoint of this step, if any (the engine, this
        rank's counters); sets start_epoch and returns the RNG states to apply before the
        next epoch (None when starting afresh)."""
        restored = self.checkpoints.restore(self.engine, self.rank)
        if restored is None:
            return None
        self.state = restored.state
        self.start_epoch = restored.epoch + 1
        if self.progress is not None:
            self.progress.write(f"step {self.step}: resuming after epoch {self.start_epoch}/"
                                f"{self.budget.epochs} (its checkpoint)")
        return restored.rng

    def write_results(self) -> None:
        """Final evaluation and the step's results (rank 0 writes model.pt, metrics.json,
        then DONE)."""
        cfg, task, step, st = self.cfg, self.task, self.step, self.state
        metrics, overlays = self.evaluate(cfg.logging.num_overlays if self.is_chief else 0)
        # Checks written into the results: every rank ends with the same weights, the teacher
        # is the previous step's model, untouched, and every rank ran as many micro-batches.
        student_digests = _gather_objects(weights_digest(self.engine.module), self.world)
        micro_batches = _gather_objects(st.micro_batches, self.world)
        teacher_digest = weights_digest(self.teacher) if self.teacher is not None else None
        bad_samples = _gather_bad_samples(st.bad, self.world)
        bad_reads = sum(_gather_objects(st.bad_reads, self.world))
        placement = self._placement()
        if self.is_chief:
            result = {"step": step, "classes": list(task.classes_at(step)), **metrics.to_dict(),
                      "train_images": len(self.job.train_keys),
                      "eval_images": len(self.job.eval_keys), "seconds": st.seconds,
                      "iterations": st.iteration, "epochs": self.budget.epochs,
                      "micro_batches_per_rank": micro_batches,
                      "skipped_bad_samples": len(bad_samples), "bad_samples": bad_samples,
                      "bad_sample_reads": bad_reads, "engine": cfg.engine.engine,
                      "precision": getattr(self.engine, "precision", "fp32"),
                      "weights_dtype": _dtype_name(self.engine.module),
                      "teacher_dtype": _dtype_name(self.teacher),
                      "observed_dtypes": st.observed_dtypes,
                      "workers": self.world, "student_digests": student_digests,
                      "teacher_digest": teacher_digest, "loss_curve": st.loss_curve,
                      "resumed_from_epoch": self.start_epoch, **placement}
            self.tracker.log_step_result(metrics.scalars(), metrics.per_class_iou, overlays,
                                         at=st.iteration)
            self.tracker.finish()
            # the engine's module holds the fp32 master weights (engine.py)
            state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                     for k, v in self.engine.module.state_dict().items()}
            self.run.save_model(step, {
                "state_dict": state, "classes_per_step": [len(s) for s in task.steps[: step + 1]],
                "class_order": list(task.seen_classes(step))})
            self.run.write_metrics(step, result)
            self.run.mark_done(step)
            self.final_state = state
        if self.world > 1:
            dist.barrier()


def run_plan(plan: SchedulePlan, report: Callable[[dict], None] | None = None,
             before_step: Callable[[int], None] | None = None,
             after_step: Callable[[int], None] | None = None) -> int:
    """Every step of `plan` in order on this worker: a step whose DONE marker exists (trained
    before a worker-group restart) is skipped; step t > 0 gets as teacher the model of t - 1,
    held by rank 0 from training it here or read from its model.pt, shared with the other
    ranks (teacher_share.TeacherHandoff); StepTrainer(job).fit(). `report` gets each epoch's
    loss (Ray Train's report); `before_step` / `after_step` are called around each step
    trained (the in-process launcher's console). Returns the number of steps trained."""
    if not plan.jobs:
        return 0
    rank, world = rank_and_world()
    first = plan.jobs[0]
    run = RunFolder(first.run_uri)
    if rank == 0:
        run.note_worker_group(first.step)  # the run's record of worker-group starts
    handoff = TeacherHandoff(run, plan.board, rank, world)
    held: tuple[int, dict] | None = None  # (step, weights) of the model this rank trained
    trained = 0
    for job in plan.jobs:
        if run.is_done(job.step):
            held = None
            continue
        if job.step > 0 and job.teacher is None:
            state = held[1] if held is not None and held[0] == job.step - 1 else None
            job = replace(job, teacher=handoff.share(job.step, state))
        if before_step:
            before_step(job.step)
        trainer = StepTrainer(job, report)
        trainer.fit()
        held = (job.step, trainer.final_state) if trainer.final_state is not None else None
        del trainer
        trained += 1
        if after_step:
            after_step(job.step)
    return trained


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer of `module` (exact equality across processes)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _dtype_name(module: torch.nn.Module | None) -> str | None:
    """"float32", "bfloat16", ... of a module's first parameter (None without a module)."""
    return None if module is None else str(next(module.parameters()).dtype).split(".")[-1]


def _gather_objects(value, world: int) -> list:
    """`value` of every rank, in rank order."""
    if world == 1:
        return [value]
    out: list = [None] * world
    dist.all_gather_object(out, value)
    return out


def _gather_bad_samples(bad: dict[tuple[str, str], str], world: int) -> list[dict]:
    """The distinct bad samples of every rank, sorted ({"shard", "key", "reason"})."""
    merged: dict[tuple[str, str], str] = {}
    for part in _gather_objects(bad, world):
        for where, reason in part.items():
            merged.setdefault(where, reason)
    return [{"shard": shard, "key": key, "reason": merged[(shard, key)]}
            for shard, key in sorted(merged)]


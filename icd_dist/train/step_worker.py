"""The training loop of one incremental step, run by every Ray Train worker.

Each worker: builds the student (from the shared teacher's weights plus the new classifier
head, or from scratch at step 0) inside the engine, the frozen teacher from the object
store, and its part of the step's data; resumes from the latest epoch checkpoint if there
is one; trains epoch by epoch (a checkpoint per epoch; rank 0 appends a line per epoch to the
step's progress file, which the driver prints); evaluates with the confusion matrix
all-reduced; and rank 0 writes the consolidated fp32 model.pt, metrics.json (with the distinct
bad samples every rank skipped, data.bad_samples=skip) and, last, the DONE marker of the step.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from icd_dist.config import Config, config_to_dict, micro_batch_and_accumulation
from icd_dist.css.remap import eval_lut, train_lut
from icd_dist.css.tasks import Task
from icd_dist.data.pipeline import StepLoader
from icd_dist.losses.methods import Method, build_method, inference_state
from icd_dist.models.deeplab import DeepLabV3, build_model, to_sync_batchnorm
from icd_dist.train.engine import PRECISION_DTYPES, build_engine
from icd_dist.train.metrics import ConfusionMatrix, step_metrics
from icd_dist.train.progress import ProgressWriter, progress_path
from icd_dist.train.run_folder import DONE
from icd_dist.train.storage import Storage
from icd_dist.train.teacher_share import build_teacher, fetch_teacher_arrays
from icd_dist.train.tracking import Tracker, overlay_image, wandb_mode

# Test hook: "STEP:EPOCH:RANK" makes that worker exit abruptly once, to test recovery.
FAILURE_ENV = "ICD_DIST_INJECT_FAILURE"


@dataclass
class StepJob:
    """Everything a worker needs for one step (pickled into the TorchTrainer config)."""

    cfg: Config
    task: Task
    step: int
    run_name: str
    run_uri: str
    train_shards: str
    eval_shards: str
    train_keys: list[str]
    eval_keys: list[str]
    teacher: object = None  # ObjectRef of the previous step's weights (None at step 0)
    failure_marker_dir: str = ""

    @property
    def folder(self) -> str:
        """The step's folder inside the run."""
        return f"step_{self.step}"


def budget(cfg: Config, step: int, num_images: int) -> tuple[int, int]:
    """(micro-batches per epoch per worker, number of epochs) of a step. An epoch is the
    selected images once (the last partial global batch dropped); optim.iterations[_
    incremental] replace the epoch budget with that many optimiser steps."""
    micro, accumulation = micro_batch_and_accumulation(cfg)
    workers = cfg.engine.num_workers
    per_epoch = max(1, num_images // (workers * micro * accumulation)) * accumulation
    iterations = cfg.optim.iterations if step == 0 else (
        cfg.optim.iterations_incremental or cfg.optim.iterations)
    if iterations:
        epochs = math.ceil(iterations * accumulation / per_epoch)
        return per_epoch, epochs
    epochs = cfg.optim.epochs if step == 0 else (cfg.optim.epochs_incremental or cfg.optim.epochs)
    return per_epoch, epochs


def total_iterations(cfg: Config, step: int, num_images: int) -> int:
    """Optimiser steps of the whole step (for the poly schedule)."""
    per_epoch, epochs = budget(cfg, step, num_images)
    _, accumulation = micro_batch_and_accumulation(cfg)
    iterations = cfg.optim.iterations if step == 0 else (
        cfg.optim.iterations_incremental or cfg.optim.iterations)
    return iterations or per_epoch * epochs // accumulation


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    if torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _teacher_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    choice = cfg.engine.teacher_dtype
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() \
            else None
    return PRECISION_DTYPES[choice]


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
        method.init_student(model, {k: torch.from_numpy(v.copy()) for k, v in arrays.items()})
    else:
        model = build_model(cfg.model, sizes)
    if device.type == "cuda" and cfg.engine.num_workers > 1 and cfg.model.norm == "batchnorm":
        model = to_sync_batchnorm(model)
    return model.to(device)


def _maybe_inject_failure(job: StepJob, epoch: int, rank: int) -> None:
    spec = os.environ.get(FAILURE_ENV)
    if not spec or not job.failure_marker_dir:
        return
    step, ep, rk = (int(x) for x in spec.split(":"))
    marker = Path(job.failure_marker_dir) / f"failed_{step}_{ep}_{rk}"
    if (step, ep, rk) == (job.step, epoch, rank) and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("injected")
        os._exit(1)


def _data_pass(loader, device: torch.device, micro_batches: int):
    """A function giving one pass (micro_batches batches) over the step's training data, for a
    method's preparation; the pass does not reuse any training epoch's augmentation."""
    def one_pass():
        loader.set_epoch(10**6)
        for i, batch in enumerate(loader):
            if i >= micro_batches:
                break
            yield batch.images.to(device, non_blocking=True), batch.labels.to(device)
    return one_pass


def evaluate(model: torch.nn.Module, loader, num_classes: int, device: torch.device,
             overlays: int = 0, bad: dict | None = None) -> tuple[ConfusionMatrix, list]:
    """Confusion matrix (all-reduced over the workers) of `model` on `loader`, and up to
    `overlays` (image, prediction, ground truth) triples from this rank; the bad samples the
    loader skipped are added to `bad` if given (see note_bad_samples)."""
    cm = ConfusionMatrix(num_classes, device=device)
    kept: list = []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            if bad is not None:
                note_bad_samples(bad, batch)
            if batch.images.numel() == 0:
                continue
            dtype = next(model.parameters()).dtype
            images = batch.images.to(device, non_blocking=True)
            labels = batch.labels.to(device)
            logits = model(images.to(dtype)).logits
            pred = logits.argmax(dim=1)
            cm.update(pred, labels)
            for k in range(min(overlays - len(kept), images.shape[0])):
                kept.append((overlay_image(images[k].float().cpu().numpy()),
                             pred[k].cpu().numpy().astype("uint8"),
                             labels[k].clamp(max=255).cpu().numpy().astype("uint8")))
    cm.all_reduce()
    return cm, kept


def train_step_worker(config: dict) -> None:
    """Ray Train loop for one step (see the module docstring)."""
    import ray.train

    job: StepJob = config["job"]
    cfg, task, step = job.cfg, job.task, job.step
    rank, world = rank_and_world()
    device = _device()
    on_gpu = device.type == "cuda"
    storage = Storage(job.run_uri)
    torch.set_num_threads(max(1, int(cfg.engine.cpus_per_worker)))

    micro, accumulation = micro_batch_and_accumulation(cfg)
    per_epoch, epochs = budget(cfg, step, len(job.train_keys))
    iterations = total_iterations(cfg, step, len(job.train_keys))
    lr = cfg.optim.lr if step == 0 else cfg.optim.lr_incremental
    method = build_method(cfg, task, step).to(device)

    student = build_student(job, device, method)
    teacher = None
    if method.needs_teacher:
        sizes = [len(s) for s in task.steps[:step]]
        teacher = build_teacher(inference_state(fetch_teacher_arrays(job.teacher)),
                                cfg.model, sizes, device, _teacher_dtype(cfg, device))
    params = [p for p in (*student.parameters(), *method.parameters()) if p.requires_grad]
    engine = build_engine(cfg, student, params, lr, iterations, on_gpu)
    # Engines consume different amounts of randomness while initialising: reseed so that
    # dropout is the same whatever the engine (and differs between ranks).
    torch.manual_seed(cfg.run.seed * 100_003 + step * 1_009 + rank)

    device_id = device.index if on_gpu else None
    train_loader = StepLoader(cfg.data, job.train_shards, job.train_keys,
                              train_lut(task, step, cfg.data.ignore_background), True, micro,
                              rank, world, cfg.run.seed + step, device_id,
                              index_dir=_index_dir(job, "train"),
                              num_threads=cfg.engine.dali_threads)
    eval_loader = StepLoader(cfg.data, job.eval_shards, job.eval_keys,
                             eval_lut(task, step, cfg.data.ignore_background,
                                      cfg.data.eval_unseen), False,
                             cfg.eval.batch_size, rank, world, cfg.run.seed, device_id,
                             index_dir=_index_dir(job, "eval"),
                             num_threads=cfg.engine.dali_threads)

    start_epoch = _restore_latest_epoch(engine, storage, job)
    method.prepare(teacher, _data_pass(train_loader, device, per_epoch))

    is_chief = rank == 0
    run_folder = Path(storage.path(job.folder)) if storage.local else \
        Path(tempfile.gettempdir()) / job.run_name / job.folder
    tracker = Tracker(is_chief, wandb_mode(cfg.logging.wandb), run_folder, cfg.logging.project,
                      cfg.logging.entity, cfg.logging.group or job.run_name,
                      f"{job.run_name}-step{step}",
                      {**config_to_dict(cfg), "step": step})
    global_step = start_epoch * per_epoch // accumulation
    bad: dict[tuple[str, str], str] = {}  # distinct skipped samples: (shard, key) -> reason
    bad_reads = 0  # how often training met one (every epoch meets it again)
    progress = ProgressWriter(storage, progress_path(step)) if is_chief else None
    if progress is not None and start_epoch:
        progress.write(f"step {step}: resuming after epoch {start_epoch}/{epochs} (its "
                       "checkpoint)")
    loss_curve: list[float] = []  # rank 0's loss at every optimiser step (this attempt)
    started = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        _maybe_inject_failure(job, epoch, rank)
        student.train()
        train_loader.set_epoch(epoch)
        seen, t0, last = 0, time.perf_counter(), {}
        for i, batch in enumerate(train_loader):
            if i >= per_epoch or global_step >= iterations:
                break
            note_bad_samples(bad, batch)
            bad_reads += batch.skipped
            images = batch.images.to(device, non_blocking=True)
            labels = batch.labels.to(device, non_blocking=True)
            teacher_out = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_out = teacher(images.to(next(teacher.parameters()).dtype))
            loss, parts = method(engine.forward(images.to(engine.input_dtype)), teacher_out,
                                 labels)
            engine.backward(loss)
            stepped = engine.step()
            global_step += int(stepped)
            if stepped and is_chief:
                loss_curve.append(float(parts["total"]))
            seen += images.shape[0]
            last = parts
            if is_chief and stepped and global_step % cfg.logging.log_every == 0:
                rate = seen * world / max(1e-9, time.perf_counter() - t0)
                tracker.log({**{f"loss/{k}": float(v) for k, v in parts.items()},
                             "lr": engine.lr(), "images_per_s": rate, "epoch": epoch},
                            step=global_step)
        if progress is not None:
            # .4g: small terms (e.g. the external ICD loss) do not print as 0.0000
            loss_text = ", ".join(f"{k} {float(v):.4g}" for k, v in last.items())
            progress.write(f"step {step} epoch {epoch + 1}/{epochs}: {loss_text} "
                           f"({seen * world / max(1e-9, time.perf_counter() - t0):.1f} img/s)")
        _save_epoch(engine, storage, job, epoch)
        ray.train.report({"epoch": epoch, "loss": float(last.get("total", 0.0))})
        if cfg.eval.every_n_epochs and (epoch + 1) % cfg.eval.every_n_epochs == 0 \
                and epoch + 1 < epochs:
            cm, _ = evaluate(engine.module, eval_loader, task.num_seen(step), device, bad=bad)
            m = step_metrics(cm, _class_names(task, step), len(task.steps[0]))
            tracker.log({f"eval/{k}": v for k, v in m.scalars().items()}, step=global_step)
    seconds = time.perf_counter() - started

    cm, overlays = evaluate(engine.module, eval_loader, task.num_seen(step), device,
                            cfg.logging.num_overlays if is_chief else 0, bad=bad)
    # Checks written into the results: every rank ends with the same weights, and the
    # teacher is the previous step's model, untouched.
    student_digests = _gather_digests(engine.module, world)
    teacher_digest = weights_digest(teacher) if teacher is not None else None
    bad_samples = _gather_bad_samples(bad, world)
    bad_reads_t = torch.tensor([bad_reads], dtype=torch.int64, device=device)
    if world > 1:
        dist.all_reduce(bad_reads_t)
    if is_chief:
        names = _class_names(task, step)
        metrics = step_metrics(cm, names, len(task.steps[0]))
        result = {"step": step, "classes": list(task.classes_at(step)), **metrics.to_dict(),
                  "train_images": len(job.train_keys), "eval_images": len(job.eval_keys),
                  "seconds": seconds, "iterations": global_step,
                  "skipped_bad_samples": len(bad_samples), "bad_samples": bad_samples,
                  "bad_sample_reads": int(bad_reads_t.item()),
                  "engine": cfg.engine.engine, "workers": world,
                  "student_digests": student_digests, "teacher_digest": teacher_digest,
                  "loss_curve": loss_curve, "resumed_from_epoch": start_epoch}
        tracker.log_step_result(metrics.scalars(), metrics.per_class_iou, overlays,
                                step=global_step)
        tracker.finish()
        state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                 for k, v in engine.module.state_dict().items()}
        storage.save_torch(f"{job.folder}/model.pt", {
            "state_dict": state, "classes_per_step": [len(s) for s in task.steps[: step + 1]],
            "class_order": list(task.seen_classes(step))})
        storage.write_json(f"{job.folder}/metrics.json", result)
        storage.write_bytes(f"{job.folder}/{DONE}", b"done\n")
    if world > 1:
        dist.barrier()


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer of `module` (exact equality across processes)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _gather_digests(module: torch.nn.Module, world: int) -> list[str]:
    digest = weights_digest(module)
    if world == 1:
        return [digest]
    out: list = [None] * world
    dist.all_gather_object(out, digest)
    return out


def note_bad_samples(bad: dict[tuple[str, str], str], batch) -> None:
    """Add the samples a batch skipped to `bad` ((shard, key) -> reason): each sample once,
    however often it is met."""
    for b in batch.bad_samples:
        bad.setdefault((b.shard, b.key), b.reason)


def _gather_bad_samples(bad: dict[tuple[str, str], str], world: int) -> list[dict]:
    """The distinct bad samples of every rank, sorted ({"shard", "key", "reason"})."""
    merged = dict(bad)
    if world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, bad)
        for part in parts:
            for where, reason in part.items():
                merged.setdefault(where, reason)
    return [{"shard": shard, "key": key, "reason": merged[(shard, key)]}
            for shard, key in sorted(merged)]


def _class_names(task: Task, step: int) -> list[str]:
    return [task.class_name(c) for c in task.seen_classes(step)]


def _index_dir(job: StepJob, split: str) -> str:
    return str(Path(tempfile.gettempdir()) / "icd_dist_index" / job.run_name / job.folder / split)


def _save_epoch(engine, storage: Storage, job: StepJob, epoch: int) -> None:
    """Every rank writes its part of the engine state into step_t/checkpoints/epoch_e; after
    a barrier rank 0 records that epoch as the latest complete one (written last) and drops
    the older checkpoint. A worker group restarted after a failure, or a re-run of the same
    run name, resumes from the epoch after it."""
    rank, world = rank_and_world()
    rel = f"{job.folder}/checkpoints/epoch_{epoch}"
    if storage.local:
        Path(storage.path(rel)).mkdir(parents=True, exist_ok=True)
        engine.save(storage.path(rel))
    else:
        with tempfile.TemporaryDirectory() as folder:
            engine.save(folder)
            for path in Path(folder).rglob("*"):
                if path.is_file():
                    storage.write_bytes(f"{rel}/{path.relative_to(folder)}", path.read_bytes())
    if world > 1:
        dist.barrier()
    if rank == 0:
        storage.write_json(f"{job.folder}/checkpoints/latest.json", {"epoch": epoch})
        previous = f"{job.folder}/checkpoints/epoch_{epoch - 1}"
        if epoch > 0 and storage.exists(previous):
            storage.fs.delete_dir(storage.path(previous))


def _restore_latest_epoch(engine, storage: Storage, job: StepJob) -> int:
    """Load the latest complete epoch checkpoint of this step, if any; returns the epoch to
    start from."""
    latest = f"{job.folder}/checkpoints/latest.json"
    if not storage.exists(latest):
        return 0
    epoch = int(storage.read_json(latest)["epoch"])
    rel = f"{job.folder}/checkpoints/epoch_{epoch}"
    if storage.local:
        engine.load(storage.path(rel))
    else:
        import pyarrow.fs as pafs

        with tempfile.TemporaryDirectory() as folder:
            selector = pafs.FileSelector(storage.path(rel), recursive=True)
            for info in storage.fs.get_file_info(selector):
                if info.type == pafs.FileType.File:
                    sub = info.path[len(storage.path(rel)) + 1:]
                    target = Path(folder) / sub
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(storage.read_bytes(f"{rel}/{sub}"))
            engine.load(folder)
    return epoch + 1

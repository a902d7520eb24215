"""Epoch checkpoints of an unfinished step: what a rank saves after each epoch, how the latest
complete one is found and restored, and when they are deleted.

    step_t/checkpoints/latest.json          {"epoch": e}, written once every rank wrote its part
    step_t/checkpoints/epoch_e/             the engine's state (DeepSpeed's or DDP's files)
    step_t/checkpoints/epoch_e/rank_r.pt    rank r's RNG states, counters (TrainState), epoch

Only the latest complete epoch is kept (committing epoch e deletes epoch e - 1), and once the
step is DONE the whole folder is deleted (`prune`) unless `run.keep_checkpoints=true`.
Restoring epoch e gives back the engine (weights, optimiser, lr schedule, applied-step count),
the rank's counters and its torch/CUDA/numpy/python RNG states, so that the loaders and the
model continue as if nothing had stopped: a resumed step ends bit-identical on CPU.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from icd_dist.train.run_folder import RunFolder


@dataclass
class TrainState:
    """What a rank counts while training, saved with every epoch checkpoint."""

    iteration: int = 0  # applied iterations (optimiser updates); "step" is the task step
    micro_batches: int = 0
    loss_curve: list[float] = field(default_factory=list)  # rank 0: loss per iteration
    bad: dict[tuple[str, str], str] = field(default_factory=dict)  # (shard, key) -> reason
    bad_reads: int = 0  # how often training met a bad sample (every epoch meets it again)
    seconds: float = 0.0  # training time over every attempt
    # dtypes the student's taps and logits (and the teacher's logits) had in training
    observed_dtypes: dict = field(default_factory=dict)

    def to_saved(self) -> dict:
        """Plain data for torch.save (weights_only loadable)."""
        return {"iteration": self.iteration, "micro_batches": self.micro_batches,
                "loss_curve": list(self.loss_curve), "bad_reads": self.bad_reads,
                "bad": [[s, k, r] for (s, k), r in self.bad.items()], "seconds": self.seconds,
                "observed_dtypes": dict(self.observed_dtypes)}

    @classmethod
    def from_saved(cls, d: dict) -> TrainState:
        """Inverse of to_saved (checkpoints from before observed_dtypes, or from before the
        iteration/step naming, whose iteration was "global_step", load too)."""
        return cls(d.get("iteration", d.get("global_step")), d["micro_batches"],
                   list(d["loss_curve"]),
                   {(s, k): r for s, k, r in d["bad"]}, d["bad_reads"], d["seconds"],
                   dict(d.get("observed_dtypes", {})))


def rng_states() -> dict:
    """This process's torch, CUDA, numpy and python RNG states (weights_only loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    """Restore what rng_states() returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


@dataclass
class Restored:
    """A rank's part of a restored epoch checkpoint (the engine is restored in place)."""

    epoch: int  # the last epoch the checkpoint completed
    state: TrainState
    rng: dict  # rng_states() as saved; apply with set_rng_states before the next epoch


class EpochCheckpoints:
    """The epoch checkpoints of one step of a run (local disk or object store)."""

    def __init__(self, run: RunFolder, step: int):
        self.run, self.step = run, step
        self.folder = f"{RunFolder.step_dir(step)}/checkpoints"

    @property
    def storage(self):
        return self.run.storage

    def latest(self) -> int | None:
        """The last epoch whose checkpoint is complete, or None."""
        rel = f"{self.folder}/latest.json"
        return int(self.storage.read_json(rel)["epoch"]) if self.storage.exists(rel) else None

    def save(self, epoch: int, engine, state: TrainState, rank: int, world: int) -> None:
        """Every rank writes its part of the engine state and its RNG states and counters;
        after a barrier rank 0 records `epoch` as the latest complete checkpoint (written
        last) and deletes the previous one. Called by every rank."""
        def write(folder: Path) -> None:
            engine.save(folder)
            torch.save({"rng": rng_states(), "state": state.to_saved(), "epoch": epoch},
                       folder / f"rank_{rank}.pt")
        self.write_files(epoch, write)
        if world > 1:
            dist.barrier()
        if rank == 0:
            self.commit(epoch)

    def restore(self, engine, rank: int) -> Restored | None:
        """Load the latest complete checkpoint into `engine` and return this rank's part
        (None when there is none: the step starts afresh)."""
        epoch = self.latest()
        if epoch is None:
            return None
        saved: dict = {}

        def read(folder: Path) -> None:
            mine = folder / f"rank_{rank}.pt"
            if not mine.is_file():
                raise RuntimeError(f"the checkpoint of epoch {epoch} of step {self.step} has "
                                   f"no state for rank {rank}: resume with the number of "
                                   "workers that wrote it (engine.num_workers)")
            engine.load(folder)
            saved.update(torch.load(mine, map_location="cpu", weights_only=True))
        self.read_files(epoch, read)
        return Restored(epoch, TrainState.from_saved(saved["state"]), saved["rng"])

    def write_files(self, epoch: int, write: Callable[[Path], None]) -> None:
        """Let `write(folder)` put this rank's files of the epoch checkpoint in a local
        folder (the checkpoint's own folder on a local disk; a temporary one uploaded after
        it otherwise)."""
        rel = f"{self.folder}/epoch_{epoch}"
        if self.run.local:
            Path(self.storage.path(rel)).mkdir(parents=True, exist_ok=True)
            write(Path(self.storage.path(rel)))
            return
        with tempfile.TemporaryDirectory() as folder:
            write(Path(folder))
            for path in Path(folder).rglob("*"):
                if path.is_file():
                    self.storage.write_bytes(f"{rel}/{path.relative_to(folder)}",
                                             path.read_bytes())

    def commit(self, epoch: int) -> None:
        """Record `epoch` as the latest complete checkpoint (once every rank wrote its part)
        and delete the one before it."""
        self.storage.write_json(f"{self.folder}/latest.json", {"epoch": epoch})
        previous = f"{self.folder}/epoch_{epoch - 1}"
        if epoch > 0 and self.storage.exists(previous):
            self.storage.fs.delete_dir(self.storage.path(previous))

    def read_files(self, epoch: int, read: Callable[[Path], None]) -> None:
        """Call `read(folder)` with a local folder holding the epoch checkpoint's files."""
        rel = f"{self.folder}/epoch_{epoch}"
        if self.run.local:
            read(Path(self.storage.path(rel)))
            return
        root = self.storage.path(rel)
        with tempfile.TemporaryDirectory() as folder:
            selector = pafs.FileSelector(root, recursive=True)
            for info in self.storage.fs.get_file_info(selector):
                if info.type == pafs.FileType.File:
                    sub = info.path[len(root) + 1:]
                    target = Path(folder) / sub
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(self.storage.read_bytes(f"{rel}/{sub}"))
            read(Path(folder))

    def prune(self) -> bool:
        """Delete the step's checkpoints if the step is DONE; True if any were deleted. An
        unfinished step keeps them (a re-run resumes from its latest epoch)."""
        if not self.run.is_done(self.step) or not self.storage.exists(self.folder):
            return False
        self.storage.fs.delete_dir(self.storage.path(self.folder))
        return True

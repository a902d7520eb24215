"""The run folder: every path of a run, in one place (RunFolder), over a Storage (a local
folder or an object-store URI); and how big the folder is.

    config.yaml  summary.json  run.log  worker_groups.log  failures/  ray/
    step_t/  model.pt  metrics.json  progress.log  DONE (written last)
    step_0/identity.json (what the step-0 model is: train/step0.py)
             checkpoints/latest.json  checkpoints/epoch_e/ (engine state, rank_{r}.pt)

Resuming needs a finished step's model.pt, metrics.json and DONE marker, and, for an
unfinished step, its latest epoch checkpoint (checkpoint.py owns the checkpoints/ folder).
"""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from icd_dist.train.storage import Storage

DONE = "DONE"  # a finished step's marker, written last (by the step loop)
CONFIG = "config.yaml"
SUMMARY = "summary.json"
MODEL = "model.pt"
METRICS = "metrics.json"
STEP0_IDENTITY = "step_0/identity.json"
WORKER_GROUPS = "worker_groups.log"  # a line per worker group that trained the run


class RunFolder:
    """The files of one run: the schedule, the step workers, `evaluate`, the step-0 cache and
    the sweep read and write run folders through this class only."""

    def __init__(self, storage: Storage | str):
        self.storage = storage if isinstance(storage, Storage) else Storage(storage)

    def uri(self, rel: str = "") -> str:
        """A path or URI of `rel` inside the run (the run itself by default)."""
        return self.storage.uri(rel)

    @property
    def local(self) -> bool:
        """Whether the run folder is on a local disk."""
        return self.storage.local

    def child(self, rel: str) -> RunFolder:
        """The run folder at `rel` inside this folder (a trial of a sweep, a cache entry)."""
        return RunFolder(self.storage.child(rel))

    # the run
    def exists(self) -> bool:
        """Whether the run folder exists."""
        return self.storage.exists("")

    def has_config(self) -> bool:
        """Whether the run's resolved config is there (a folder made by a run)."""
        return self.storage.exists(CONFIG)

    def write_config(self, text: str) -> None:
        """Keep the run's resolved config (YAML) beside its results."""
        self.storage.makedirs()
        self.storage.write_bytes(CONFIG, text.encode())

    def read_config(self) -> str:
        """The run's resolved config (YAML text)."""
        return self.storage.read_bytes(CONFIG).decode()

    def write_summary(self, summary: dict) -> None:
        """The run's summary.json."""
        self.storage.write_json(SUMMARY, summary)

    def note_worker_group(self, first_step: int) -> None:
        """Record that a worker group started training this run at `first_step` (one line
        of worker_groups.log; rank 0 writes it when the schedule loop starts)."""
        rel = WORKER_GROUPS
        before = self.storage.read_bytes(rel) if self.storage.exists(rel) else b""
        stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.storage.write_bytes(rel, before + f"{stamp} first step {first_step}\n".encode())

    def worker_group_starts(self) -> int:
        """How many worker groups have started training this run (all invocations)."""
        if not self.storage.exists(WORKER_GROUPS):
            return 0
        return len(self.storage.read_bytes(WORKER_GROUPS).decode().splitlines())

    def failures_dir(self) -> str:
        """Where injected test failures leave their markers ("" for object stores)."""
        return self.storage.uri("failures") if self.local else ""

    # a step
    @staticmethod
    def step_dir(step: int) -> str:
        """The folder of `step`, relative to the run folder."""
        return f"step_{step}"

    def is_done(self, step: int) -> bool:
        """Whether `step` finished (its DONE marker, written last, is there)."""
        return self.storage.exists(f"step_{step}/{DONE}")

    def done_steps(self, num_steps: int) -> list[int]:
        """The finished steps among 0 .. num_steps - 1."""
        return [t for t in range(num_steps) if self.is_done(t)]

    def mark_done(self, step: int) -> None:
        """Write the DONE marker of `step` (after its model and metrics)."""
        self.storage.write_bytes(f"step_{step}/{DONE}", b"done\n")

    def save_model(self, step: int, payload: dict) -> None:
        """model.pt of `step`: {"state_dict" (fp32), "classes_per_step", "class_order"}."""
        self.storage.save_torch(f"step_{step}/{MODEL}", payload)

    def load_model(self, step: int) -> dict:
        """What save_model wrote (loaded with weights_only=True)."""
        return self.storage.load_torch(f"step_{step}/{MODEL}")

    def has_metrics(self, step: int) -> bool:
        """Whether metrics.json of `step` is there."""
        return self.storage.exists(f"step_{step}/{METRICS}")

    def write_metrics(self, step: int, metrics: dict) -> None:
        """metrics.json of `step`."""
        self.storage.write_json(f"step_{step}/{METRICS}", metrics)

    def read_metrics(self, step: int) -> dict:
        """metrics.json of `step`."""
        return self.storage.read_json(f"step_{step}/{METRICS}")

    def progress(self, step: int) -> str:
        """The progress file of `step`, relative to the run folder."""
        return f"step_{step}/progress.log"

    def local_step_dir(self, step: int, run_name: str) -> Path:
        """A local folder for the files of `step` that are written by other libraries (W&B):
        the step's folder itself on a local disk, else one in the temporary directory."""
        if self.local:
            return Path(self.storage.path(self.step_dir(step)))
        return Path(tempfile.gettempdir()) / run_name / self.step_dir(step)

    def write_step0_identity(self, identity: dict) -> None:
        """step_0/identity.json: what this run's step-0 model is (train/step0.py)."""
        self.storage.write_json(STEP0_IDENTITY, identity)

    def read_step0_identity(self) -> dict | None:
        """What write_step0_identity wrote; None for a run from before identities."""
        return self.storage.read_json(STEP0_IDENTITY) if self.storage.exists(STEP0_IDENTITY) \
            else None

    def copy_step(self, step: int, source: RunFolder) -> None:
        """Copy a finished step (step 0's identity, model, metrics, then the DONE marker)
        from `source`."""
        if not source.is_done(step):
            raise FileNotFoundError(f"{source.uri(self.step_dir(step))} is not a finished "
                                    f"step (no {DONE})")
        identity = [STEP0_IDENTITY] if step == 0 and source.storage.exists(STEP0_IDENTITY) \
            else []
        for rel in (*identity, *(f"step_{step}/{name}" for name in (MODEL, METRICS, DONE))):
            self.storage.write_bytes(rel, source.storage.read_bytes(rel))

    def size_bytes(self) -> int:
        """The total size of the run folder's files."""
        return folder_bytes(self.storage)


def folder_bytes(storage: Storage) -> int:
    """The total size of the files under the storage's root."""
    selector = pafs.FileSelector(storage.path(""), recursive=True, allow_not_found=True)
    return sum(info.size or 0 for info in storage.fs.get_file_info(selector)
               if info.type == pafs.FileType.File)


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KB', 93_600_000 -> '93.6 MB' (powers of 1000, as `du --si`)."""
    if n < 1000:
        return f"{n} bytes"
    size = n / 1000
    for unit in ("KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"

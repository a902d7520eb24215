"""What a run folder keeps, and how big it is.

Resuming needs a finished step's model.pt, metrics.json and DONE marker, and, for an
unfinished step, its latest epoch checkpoint (the step loop keeps only that one). Once a step
is DONE its engine checkpoint (DeepSpeed's model and optimiser states, several times the
model's size) serves nothing, so it is deleted unless `run.keep_checkpoints=true`.
"""

from __future__ import annotations

import pyarrow.fs as pafs

from icd_dist.train.storage import Storage

DONE = "DONE"  # a finished step's marker, written last (by the step loop, step_worker)


def checkpoints_dir(step: int) -> str:
    """The epoch checkpoints of `step`, relative to the run folder."""
    return f"step_{step}/checkpoints"


def prune_checkpoints(storage: Storage, step: int) -> bool:
    """Delete the epoch checkpoints of `step` if the step is DONE; True if any were deleted.
    An unfinished step keeps them (a re-run resumes from its latest epoch)."""
    folder = checkpoints_dir(step)
    if not storage.exists(f"step_{step}/{DONE}") or not storage.exists(folder):
        return False
    storage.fs.delete_dir(storage.path(folder))
    return True


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

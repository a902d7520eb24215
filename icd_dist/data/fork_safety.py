"""Whether DataLoader workers may still be forked from this process.

Forking is the cheap way to start loader workers (they inherit the imported modules), and
unsafe once the process holds state a child must not copy mid-use: an object-store client
(pyarrow's S3/GCS filesystems), or a DALI pipeline's worker threads (a loader worker forked
after a DALI pipeline ran here crashes or hangs). Workers of remote shards are spawned;
dali_pipeline records each pipeline it builds here, and every loader's workers are spawned
from then on.
"""

from __future__ import annotations

_reasons: set[str] = set()


def note_fork_unsafe(reason: str) -> None:
    """Record that this process now holds state forked loader workers must not inherit."""
    _reasons.add(reason)


def loader_context(num_workers: int, remote: bool = False) -> str | None:
    """The multiprocessing context for `num_workers` DataLoader workers: "spawn" for
    workers reading remote shards (the manifest was read through an object-store client) or
    once note_fork_unsafe was called; None (the platform's default, fork on Linux) else."""
    if num_workers > 0 and (remote or _reasons):
        return "spawn"
    return None

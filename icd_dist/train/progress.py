"""A step's progress lines, from rank 0 to the driver's console, through the run folder.

Rank 0 appends one line per epoch to `step_t/progress.log` (ProgressWriter); while the step
trains, the driver prints the lines that are new (ProgressFollower, polling the file), and
prints whatever is left once the step is over, so every line appears once and in order,
however late the polling. The file stays in the run folder as the step's record; a step that
resumes (a re-run, or a worker group restarted after a failure) appends to it, and the
driver prints only what was written after it started following.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from icd_dist.train.storage import Storage


class ProgressWriter:
    """Appends lines to a progress file (local: appended and flushed line by line; object
    stores: the whole file rewritten, as they cannot append)."""

    def __init__(self, storage: Storage, rel: str):
        self.storage, self.rel = storage, rel
        self._lines: list[str] | None = None

    def write(self, line: str) -> None:
        """Add one line (no newline inside)."""
        line = line.replace("\n", " ")
        if self.storage.local:
            self.storage.makedirs(self.rel.rsplit("/", 1)[0] if "/" in self.rel else "")
            with open(self.storage.path(self.rel), "a") as f:
                f.write(line + "\n")
            return
        if self._lines is None:
            self._lines = self._existing()
        self._lines.append(line)
        self.storage.write_bytes(self.rel, "".join(f"{x}\n" for x in self._lines).encode())

    def _existing(self) -> list[str]:
        if not self.storage.exists(self.rel):
            return []
        return self.storage.read_bytes(self.rel).decode().splitlines()


def read_complete_lines(storage: Storage, rel: str) -> list[str]:
    """The newline-terminated lines of the file (a line still being written is left out)."""
    if not storage.exists(rel):
        return []
    text = storage.read_bytes(rel).decode(errors="replace")
    return text.split("\n")[:-1]


class ProgressFollower:
    """Prints (through `emit`) the lines added to a progress file after it was created;
    use as a context manager around the step's training."""

    def __init__(self, storage: Storage, rel: str, emit: Callable[[str], None],
                 interval_s: float = 2.0):
        self.storage, self.rel, self.emit, self.interval_s = storage, rel, emit, interval_s
        self._done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> None:
        """Print the complete lines not printed yet."""
        with self._lock:
            lines = read_complete_lines(self.storage, self.rel)
            for line in lines[self._done:]:
                self.emit(line)
            self._done = max(self._done, len(lines))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except OSError:  # a transient read error: the final poll prints the rest
                continue

    def __enter__(self) -> ProgressFollower:
        self._done = len(read_complete_lines(self.storage, self.rel))
        self._thread = threading.Thread(target=self._loop, name="icd-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError):  # a read error must not hide the step's outcome
            self.poll()

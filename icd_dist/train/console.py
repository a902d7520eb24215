"""The driver's console and the run's log file.

RunLog: every line the driver prints goes to the console (stderr) and, time-stamped, to
`run.log` in the run folder; what would drown the console (a worker's traceback) goes to
run.log only. step_failure(): a step whose training failed, as one line: a data error names
shard, sample and reason; anything else its type and message; the traceback in run.log.
"""

from __future__ import annotations

import datetime as dt
import sys
import traceback
from collections.abc import Callable

from icd_dist.data.errors import BadSampleError
from icd_dist.train.storage import Storage

RUN_LOG = "run.log"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class RunLog:
    """A Log (callable with one message) that prints and records. Lines logged before the run
    folder is known are kept and written when `attach` names it."""

    def __init__(self, echo: Callable[[str], None] | None = None):
        self.echo = echo or _stderr
        self.storage: Storage | None = None
        self._records: list[str] = []

    def __call__(self, msg: str) -> None:
        """Print `msg` and record it."""
        self.echo(msg)
        self.detail(msg)

    def detail(self, text: str) -> None:
        """Record `text` in run.log only."""
        record = f"{dt.datetime.now().strftime('%H:%M:%S')} {text.rstrip()}\n"
        self._records.append(record)
        if self.storage is not None:
            self._write([record])

    def attach(self, storage: Storage) -> None:
        """Write run.log in this run folder from now on (with what was logged so far)."""
        self.storage = storage
        self._write(self._records)

    @property
    def location(self) -> str:
        """Where run.log is (for messages)."""
        return self.storage.uri(RUN_LOG) if self.storage is not None else RUN_LOG

    def _write(self, records: list[str]) -> None:
        if self.storage.local:
            self.storage.makedirs()
            with open(self.storage.path(RUN_LOG), "a") as f:
                f.writelines(records)
        else:  # object stores cannot append: the whole log, rewritten
            self.storage.write_bytes(RUN_LOG, "".join(self._records).encode())


class StepFailedError(RuntimeError):
    """A step's training failed. The message is one line; `exit_code` is 2 for bad input
    data (as for any input error), 1 otherwise."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _causes(exc: BaseException):
    """`exc` and every exception inside it: Ray Train's per-worker failures (and the user
    exception each wraps), the controller's failure, causes and contexts."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "worker_failures", None) or {}
        stack.extend(failures[rank] for rank in sorted(failures, reverse=True))
        stack.extend([getattr(e, "_base_exc", None), getattr(e, "controller_failure", None),
                      e.__cause__, e.__context__])


def _root(exc: BaseException) -> BaseException:
    """The error behind a Ray Train failure: the lowest rank's worker error (Ray keeps the
    user's exception there), a controller's failure, or `exc` itself."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        return _root(failures[min(failures)])
    for attr in ("_base_exc", "controller_failure"):
        inner = getattr(exc, attr, None)
        if inner is not None:
            return _root(inner)
    return exc


def data_error_line(err: BadSampleError) -> str:
    """'shard S, sample 'K': reason', one line. A DataLoader worker re-raises the error with
    its own traceback as the message: the error's line is then taken from its end."""
    text = str(err)
    if "\n" not in text:
        return text
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "BadSampleError: " in line:
            return line.split("BadSampleError: ", 1)[1]
    return lines[-1]


def step_failure(step: int, exc: BaseException, log: RunLog) -> StepFailedError:
    """The one-line error of a failed step; the whole traceback goes to run.log."""
    log.detail(f"step {step} failed:\n" + "".join(traceback.format_exception(exc)))
    where = f" (traceback in {log.location})"
    data = next((e for e in _causes(exc) if isinstance(e, BadSampleError)), None)
    if data is not None:
        return StepFailedError(f"step {step}: bad input data: {data_error_line(data)}{where}",
                               2)
    base = _root(exc)
    first = next((ln for ln in str(base).splitlines() if ln.strip()), "")
    return StepFailedError(f"step {step} failed: {type(base).__name__}: {first}{where}", 1)

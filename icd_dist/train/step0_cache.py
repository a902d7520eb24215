"""The shared step 0 of a sweep: every trial and schedule with the same step-0 identity
(train/step0.py) starts from one trained model. `{storage_path}/step0_cache/{key}/`, the key
a hash of the identity, is a run folder holding step_0/ (with its identity.json) and a
record of every training of it (trainings.json).
"""

from __future__ import annotations

import datetime as dt

from icd_dist.config import Config, update
from icd_dist.train.run_folder import RunFolder
from icd_dist.train.schedule import run_schedule
from icd_dist.train.storage import Storage

CACHE_FOLDER = "step0_cache"


class Step0Cache:
    """Step-0 run folders under `{storage_path}/step0_cache`, one per key."""

    def __init__(self, storage_path: str):
        self.root = Storage(storage_path).child(CACHE_FOLDER)

    def run_folder(self, key: str) -> RunFolder:
        """The run folder of `key` (its step_0/ is the shared model)."""
        return RunFolder(self.root.child(key))

    def is_ready(self, key: str) -> bool:
        """Whether step 0 of `key` has finished."""
        return self.run_folder(key).is_done(0)

    def trainings(self, key: str) -> list[dict]:
        """Every training of `key`'s step 0 so far (normally exactly one)."""
        folder = self.run_folder(key).storage
        return list(folder.read_json("trainings.json")) if folder.exists("trainings.json") \
            else []

    def train(self, cfg: Config, key: str, log, by: str) -> None:
        """Train step 0 of `key` with `cfg` (resuming an interrupted training) and record it;
        the run writes the identity (step_0/identity.json)."""
        folder = self.run_folder(key).storage
        folder.makedirs()
        started = dt.datetime.now().isoformat(timespec="seconds")
        step_cfg = update(cfg, {"run.name": key, "run.storage_path": self.root.uri()})
        run_schedule(step_cfg, log=log, last_step=0)
        folder.write_json("trainings.json", [*self.trainings(key), {"started": started,
                                                                   "by": by}])

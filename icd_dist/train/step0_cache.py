"""The shared step 0 of a sweep: step 0 trains with plain CE on the step-0 classes, so it does
not depend on any distillation weight (ICD_METHOD.md) and every trial and schedule with the
same step-0 identity can start from one trained model.

The identity is everything that shapes the step-0 model: the data config (shards,
augmentation, crop), the step-0 classes, the setting and the exact set of step-0 training
images, the model config (model.classifier=dkd: DKD's own step 0), the step-0 optimisation,
the method's step-0 settings where it has any (Method.step0_identity: DKD's mBCE and AC
weights, step-0 pos_weight, head lr factor), the engine's numerics, the seed and the
version of the step-0 training code (STEP0_PROTOCOL). Its
hash is the key; `{storage_path}/step0_cache/{key}/` is a run folder holding step_0/, the
identity (identity.json) and a record of every training of it (trainings.json).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence

from icd_dist.config import Config, config_to_dict, update
from icd_dist.css.tasks import Task
from icd_dist.losses.methods import method_class
from icd_dist.train.run_folder import RunFolder
from icd_dist.train.schedule import run_schedule, step0_model_config
from icd_dist.train.storage import Storage

CACHE_FOLDER = "step0_cache"
# Bumped whenever step-0 training changes in a way no config key shows (2: the CE averaged
# over all pixels as MiB/PLOP, their RandomResizedCrop; 3: epochs padded to whole optimiser
# steps instead of dropping the last global batch, bf16 as autocast over fp32 weights; 4: bf16
# under DeepSpeed through its own torch_autocast section, which on a GPU trained in fp32
# before), so older cached models are not reused. The head (model.head) is in the identity.
STEP0_PROTOCOL = 4
_STEP0_OPTIM = ("optimizer", "lr", "momentum", "nesterov", "weight_decay", "poly_power",
                "batch_size", "epochs", "iterations")
_NUMERICS = ("engine", "num_workers", "micro_batch_size", "precision", "zero_stage")


def step0_identity(cfg: Config, task: Task, train_keys: Sequence[str]) -> dict:
    """What the step-0 model of `task` under `cfg` depends on, as plain data."""
    full = config_to_dict(cfg)
    method = method_class(cfg).step0_identity(cfg)
    return {
        "dataset": task.dataset,
        "data": full["data"],
        "setting": task.setting,
        "classes": [int(c) for c in task.classes_at(0)],
        "train_images": hashlib.sha256("\n".join(sorted(train_keys)).encode()).hexdigest(),
        "model": step0_model_config(full["model"]),
        "optim": {k: full["optim"][k] for k in _STEP0_OPTIM},
        "engine": {k: full["engine"][k] for k in _NUMERICS},
        "seed": cfg.run.seed,
        "protocol": STEP0_PROTOCOL,
        **({"method": method} if method else {}),  # absent for the shared CE step 0
    }


def step0_key(identity: dict) -> str:
    """A short content hash of a step-0 identity."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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

    def train(self, cfg: Config, key: str, identity: dict, log, by: str) -> None:
        """Train step 0 of `key` with `cfg` (resuming an interrupted training) and record it."""
        folder = self.run_folder(key).storage
        folder.makedirs()
        folder.write_json("identity.json", identity)
        started = dt.datetime.now().isoformat(timespec="seconds")
        step_cfg = update(cfg, {"run.name": key, "run.storage_path": self.root.uri()})
        run_schedule(step_cfg, log=log, last_step=0)
        folder.write_json("trainings.json", [*self.trainings(key), {"started": started,
                                                                   "by": by}])

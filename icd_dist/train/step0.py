"""What a step-0 model is: its identity, the one answer to "can this step 0 be reused?" for
`--step0-from`, the sweep's step-0 cache (step0_cache.py) and the CamVid benchmark (which
passes `--step0-from`).

Step 0 trains with plain CE on the step-0 classes (DKD: its own mBCE and AC), so it does not
depend on any distillation weight (ICD_METHOD.md). Its identity is everything that shapes
the step-0 model: the data config (shards, augmentation, crop), the step-0 classes, the
setting and the exact set of step-0 training images, the model config (model.classifier=dkd:
DKD's own step 0), the step-0 optimisation, the method's step-0 settings where it has any
(Method.step0_identity: DKD's mBCE and AC weights, step-0 pos_weight, head lr factor), the
engine's numerics, the seed and the version of the step-0 training code (STEP0_PROTOCOL).

A run that trains (or copies) a step 0 writes its identity as step_0/identity.json. The
sweep's cache reuses a step 0 only under its whole identity (the key is its hash), as the
benchmark's plan does; `--step0-from`, the user's explicit choice, refuses another model
(architecture, classes, DKD's own step 0) and reports any other difference.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import yaml

from icd_dist.config import Config, ConfigError, config_to_dict
from icd_dist.css.tasks import Task
from icd_dist.methods import method_class
from icd_dist.models.deeplab import resolve_head
from icd_dist.train.run_folder import RunFolder

# Bumped whenever step-0 training changes in a way no config key shows (2: the CE averaged
# over all pixels as MiB/PLOP, their RandomResizedCrop; 3: epochs padded to whole optimiser
# steps instead of dropping the last global batch, bf16 as autocast over fp32 weights; 4: bf16
# under DeepSpeed through its own torch_autocast section, which on a GPU trained in fp32
# before), so older cached models are not reused. The head (model.head) is in the identity.
STEP0_PROTOCOL = 4
_STEP0_OPTIM = ("optimizer", "lr", "momentum", "nesterov", "weight_decay", "poly_power",
                "batch_size", "epochs", "iterations")
_NUMERICS = ("engine", "num_workers", "micro_batch_size", "precision", "zero_stage")
# Model keys that do not change the step-0 model: the classifier init of later steps and
# which activations are tapped (step 0 trains with CE on the logits only).
STEP0_NEUTRAL_MODEL_KEYS = ("mib_init", "taps")
# Model keys added later, at the value every earlier model had: left out at that value, so
# earlier step-0 models (their config.yaml, their cache keys) still match. model.classifier=dkd
# (DKD's own step 0) is kept and makes another step-0 model.
STEP0_LEGACY_DEFAULTS = {"classifier": "standard"}
# A model config written before model.head existed had DKD's/torchvision's head.
HEAD_BEFORE_THE_KEY = "deeplabv3"
# What the step-0 model is (its weights and the classes it learned), as opposed to how it was
# trained: `--step0-from` refuses a source that differs here.
MODEL_FIELDS = ("dataset", "classes", "model", "method")
# Identity fields that are not config sections: the config key a refusal names for them.
_FIELD_KEYS = {"dataset": "data.dataset", "setting": "task.setting", "classes": "task",
               "train_images": "data.train_shards", "seed": "run.seed", "method": "loss",
               "protocol": "step0"}


def step0_model_config(model: dict) -> dict:
    """The part of a model config (as a dict) that shapes the step-0 model; model.head as the
    head it resolves to (auto is MiB's or DKD's by the classifier)."""
    out = {k: v for k, v in model.items() if k not in STEP0_NEUTRAL_MODEL_KEYS
           and not (k in STEP0_LEGACY_DEFAULTS and v == STEP0_LEGACY_DEFAULTS[k])}
    out["head"] = resolve_head(model["head"], model.get("classifier", "standard")) \
        if "head" in model else HEAD_BEFORE_THE_KEY
    return out


def step0_identity(cfg: Config, task: Task, train_keys: Sequence[str]) -> dict:
    """What the step-0 model of `task` under `cfg`, trained on the samples `train_keys`,
    depends on, as plain data."""
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


def identity_differences(ours: dict, theirs: dict, prefix: str = "") -> list[str]:
    """The dotted fields where two identities differ, "field: ours here, theirs there"."""
    out = []
    for key in [*ours, *(k for k in theirs if k not in ours)]:
        a, b = ours.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} here, {b!r} there")
    return out


def check_step0_source(cfg: Config, task: Task, source: RunFolder,
                       identity: dict) -> list[str]:
    """Whether the finished step 0 in `source` can be this run's (`--step0-from`): a
    ConfigError, naming the fields, where its identity (step_0/identity.json) differs in what
    the model is (MODEL_FIELDS: dataset, step-0 classes, model config, the method's step-0
    loss); the other differences (how it was trained: data, images, optimisation, engine,
    seed, code version) are returned, for the run to report. The sweep's cache and the
    benchmark never meet those: their step 0 has the run's whole identity. A step 0 trained
    before identities were written is checked on its classes and model config."""
    if not source.is_done(0):
        raise FileNotFoundError(f"{source.uri('step_0')} is not a finished step")
    theirs = source.read_step0_identity()
    if theirs is not None:
        diffs = identity_differences(identity, theirs)
        refused = [d for d in diffs if d.split(".")[0].split(":")[0] in MODEL_FIELDS]
        if refused:
            field = refused[0].split(":")[0]
            key = _FIELD_KEYS.get(field.split(".")[0], field)
            raise ConfigError(key, f"step 0 in {source.uri()} is another step-0 model than "
                              f"this run's: {'; '.join(refused)}. Train this run's own step 0 "
                              "(no --step0-from) or point to one of this model")
        return [d for d in diffs if d not in refused]
    classes = source.read_metrics(0)["classes"]
    if list(classes) != [int(c) for c in task.classes_at(0)]:
        raise ConfigError("task", f"step 0 in {source.uri()} learned classes {classes}, this "
                          f"task's step 0 is {list(task.classes_at(0))}")
    if source.has_config():
        model = (yaml.safe_load(source.read_config()) or {}).get("model")
        ours = step0_model_config(config_to_dict(cfg)["model"])
        if model is not None and step0_model_config(model) != ours:
            raise ConfigError("model", f"step 0 in {source.uri()} has model {model}, this run "
                              f"has {ours}")
    return []

"""The continual-learning methods, one module each, and their registry (METHODS).

A method owns everything that differs between methods, so the training loop, the sweep,
`evaluate` and the benchmark name none (methods/base.py is the interface):
- `check_config(cfg)`: its rules on a config (the segmentation losses it trains with, the
  classifier it trains: model.classifier=dkd for DKD, whose head is then DKD's ASPP);
- `loss_keys()`: the loss.* keys it reads (config.LossConfig holds their sections: the schema
  is the bottom module, loaded before torch);
- `step0_identity(cfg)`: its settings that shape its step-0 model ({} for the CE-trained step 0
  every method but DKD shares; train/step0.py);
- `init_student(model, state)`: at step t > 0, the previous model's weights and this step's
  classes with the method's classifier init (random for ft, MiB's for the others unless
  model.mib_init says otherwise); ICD's learned MSCA lives here;
- `prepare(teacher, data_pass)`: per-step state computed before training (PLOP's entropy
  thresholds, from one pass of the teacher over the step's training data);
- `forward(student, teacher, labels)`: the step's total loss and its detached components;
- `set_train_mode(model)`: after model.train() every epoch, the method's module modes (DKD:
  frozen BatchNorm statistics and no dropout at t > 0);
- `param_groups(model, params, lr)`: the optimiser's parameter groups (DKD: the head and
  classifiers at ten times the backbone's lr);
- `search_space(cfg)`: what `tune.space: method` searches (its `search_weights` around its
  authors' values, and optim.lr_incremental a decade either side of the config's).

At step 0 every method but DKD trains with plain cross-entropy (there is no teacher). At
step t > 0:

- ft:    CE
- joint: CE, every class in one (offline) step
- mib:   unbiased CE + lambda_kd * unbiased KD
- plop:  CE on pseudo-labels (per-image classification factor)
         + s_t * (lambda_pod * sum_l POD_l + lambda_pod_logits * POD_logits) / (L + 1)
- icd:   unbiased CE + lambda_kd * unbiased KD
         + s_t * (lambda_int * L_int + lambda_ext * L_ext)   (s_t off: adaptive_factor=false)
- dkd:   mbce * L_mBCE + kd * L_KD + dkd_pos * L_pos + dkd_neg * L_neg + ac * L_AC on DKD's
         sigmoid classifier (losses/dkd.py); its step 0 trains mbce * L_mBCE + ac * L_AC

Adding a method: a module here with its Method subclass, one line in METHODS, its name in
config.MethodConfig and, if it has weights of its own, their section in config.LossConfig.
"""

from __future__ import annotations

from icd_dist.config import Config, ConfigError
from icd_dist.css.tasks import Task
from icd_dist.methods.base import Method, inference_state
from icd_dist.methods.dkd import DKD
from icd_dist.methods.ft import FineTuning
from icd_dist.methods.icd import ICD
from icd_dist.methods.joint import Joint
from icd_dist.methods.mib import MiB
from icd_dist.methods.plop import PLOP

METHODS: dict[str, type[Method]] = {
    "ft": FineTuning,
    "joint": Joint,
    "mib": MiB,
    "plop": PLOP,
    "icd": ICD,
    "dkd": DKD,
}

__all__ = ["METHODS", "Method", "build_method", "inference_state", "method_class"]


def method_class(cfg: Config) -> type[Method]:
    """The Method class of `cfg.method.name`."""
    return method_named(cfg.method.name)


def method_named(name: str) -> type[Method]:
    """The Method class registered as `name` (a ConfigError naming method.name if none)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError("method.name", f"unknown method {name!r}; allowed: "
                          f"{', '.join(METHODS)}") from None


def build_method(cfg: Config, task: Task, step: int) -> Method:
    """The method `cfg.method.name` at `step` of `task` (its config checked)."""
    return method_class(cfg)(cfg, task, step)

"""The configuration of a run: a typed, frozen dataclass schema, loaded from YAML files that
compose plus `key=value` overrides, validated with errors that name the key.

Composition: a YAML file may list the files it extends under `bases:` (paths relative to
that file); bases are merged in order, then the file itself, then the overrides. Mappings
merge key by key; any other value (lists included) replaces what was there.

    cfg = load_config("configs/voc/15-1_icd.yaml", ["optim.lr=0.02", "task.setting=disjoint"])

Every error is a ConfigError whose message starts with the dotted key and says what is
allowed; where the key came from a file or an override, that source is named too. A field's
type says what it takes, and a value rule beyond the type sits on the field itself
(`positive`, `non_negative`, `ruled`).

In code, a config changes one way, by typed values (no text parsed back):

    cfg = update(cfg, {"run.name": "93760_00000", "loss.icd.stats": ("std", "max")})
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

BASES_KEY = "bases"


class ConfigError(ValueError):
    """A configuration key, type or value that is not allowed; the message names the key."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key = key
        self.detail = message
        self.source = source
        where = f" (set in {source})" if source else ""
        super().__init__(f"{key}: {message}{where}" if key else f"{message}{where}")

    def __reduce__(self):
        # crosses process boundaries intact (Ray re-raises worker errors in the driver)
        return (type(self), (self.key, self.detail, self.source))


# --------------------------------------------------------------------------------------
# Schema: each field's type and default, and its value rule where the type is not enough
# --------------------------------------------------------------------------------------

RULE = "rule"  # a field's metadata key: (predicate, what is allowed)


def ruled(default: Any, check: Callable[[Any], bool], allowed: str) -> Any:
    """A schema field with `default` whose values must pass `check`; `allowed` says what is
    allowed, in the error a value that fails it gets."""
    return field(default=default, metadata={RULE: (check, allowed)})


def positive(default: Any, allowed: str) -> Any:
    """A field whose value, unless null, must be > 0."""
    return ruled(default, lambda v: v is None or v > 0, allowed)


def non_negative(default: Any, allowed: str) -> Any:
    """A field whose value, unless null, must be >= 0."""
    return ruled(default, lambda v: v is None or v >= 0, allowed)



@dataclass(frozen=True)
class RunConfig:
    """Identity and place of a run."""

    # None -> "{dataset}-{task}-{method}-{time}"; re-using a name resumes that run.
    name: str | None = None
    # A local folder or a URI pyarrow understands (s3://, gs://).
    storage_path: str = "runs"
    seed: int = 0
    # Keep every finished step's epoch checkpoint (DeepSpeed/DDP engine state); by default
    # it is deleted once the step is DONE: resuming needs only model.pt of finished steps.
    keep_checkpoints: bool = False


@dataclass(frozen=True)
class SyntheticDataConfig:
    """The synthetic dataset that `data.dataset=synthetic` builds on first use (if its shard
    folders do not exist yet)."""

    num_train: int = positive(96, "a positive integer")
    num_eval: int = positive(32, "a positive integer")
    classes: int = ruled(5, lambda v: 2 <= v <= 255, "an integer in 2..255")
    height: int = positive(64, "a positive integer")
    width: int = positive(80, "a positive integer")
    seed: int = 0


# The named datasets (their classes: css/classes.py; raw readers: data/readers.py); a config
# may also name the synthetic one.
DATASETS = ("voc", "ade20k", "camvid")


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how samples are read and augmented."""

    dataset: Literal[(*DATASETS, "synthetic")] = "voc"
    train_shards: str | None = None
    eval_shards: str | None = None
    # auto = DALI on GPU workers, the faster CPU pipeline on CPU workers.
    pipeline: Literal["auto", "dali", "torch"] = "auto"
    crop_size: int = positive(512, "a positive integer")
    scale_min: float = positive(0.5, "a positive number")
    scale_max: float = positive(2.0, "a positive number")
    hflip: bool = True
    # inside = MiB/PLOP's RandomResizedCrop (10 draws inside the image, then their central
    # fallback); padded = the previous behaviour, a box larger than the image is padded
    # (image 0, mask 255).
    crop_mode: Literal["inside", "padded"] = "inside"
    # Evaluation: resize the shorter side to eval_size, then centre crop eval_size.
    eval_size: int = positive(512, "a positive integer")
    loader_workers: int = non_negative(2, "an integer >= 0")
    # fail = stop at the first bad sample; skip = skip it, name it, count it.
    bad_samples: Literal["fail", "skip"] = "fail"
    # Before Ray starts, the run's shards are checked against the manifest: sizes, and sha256
    # unless false (very large data: sizes only).
    verify: bool = True
    # ADE20K: ignore id 0 at evaluation (as MiB) instead of scoring it as background (PLOP,
    # RCIL); training labels keep it as background 0 either way (as MiB trains).
    ignore_background: bool = False
    # Evaluation at step t scores only the eval images with a class seen so far other than
    # background (MiB/PLOP's test set); false = every eval image.
    eval_filter: bool = True
    # What classes not yet seen at step t become in the evaluation labels: background 0
    # (PLOP) or ignore 255 (MiB).
    eval_unseen: Literal["background", "ignore"] = "background"
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)


@dataclass(frozen=True)
class TaskConfig:
    """The incremental schedule: a registered name or an explicit list of class-id lists."""

    name: str = "15-1"
    # Explicit steps, e.g. [[0, 1, 2], [3], [4]]; when given, `name` only labels the run.
    steps: tuple[tuple[int, ...], ...] | None = ruled(
        None, lambda v: v is None or (len(v) > 0 and all(len(s) > 0 for s in v)),
        "a non-empty list of non-empty class-id lists")
    setting: Literal["overlap", "disjoint"] = "overlap"


@dataclass(frozen=True)
class ModelConfig:
    """The segmentation network."""

    backbone: Literal["resnet101", "resnet50", "resnet18", "mobilenet_v3_large"] = "resnet101"
    output_stride: Literal[8, 16] = 16
    head_channels: int = positive(256, "a positive integer")
    norm: Literal["batchnorm", "groupnorm"] = "batchnorm"
    # Backbone taps: the stages' outputs, or their last blocks' outputs before the final
    # activation (PLOP's network; the PLOP configs use it). The network computes the same
    # either way, so step 0 does not depend on it.
    taps: Literal["post_activation", "pre_activation"] = "post_activation"
    # A file with ImageNet weights (torchvision or in-place-ABN format); never downloaded.
    # VOC and ADE20K runs refuse to start without one; "none" trains from scratch on purpose.
    pretrained: str | None = None
    # MiB's initialisation of the new classifier heads at steps t > 0; None = the method's
    # own choice (ft and joint: the layer's random init, as standard fine-tuning; mib, plop
    # and icd: MiB's).
    mib_init: bool | None = None
    # The classifier on the head: standard (softmax logits, one 1x1 conv per step) or dkd
    # (DKD's sigmoid classifiers with an auxiliary one and reasoning maps); method dkd needs
    # dkd, every other method standard (configs/_base/methods/dkd.yaml sets it).
    classifier: Literal["standard", "dkd"] = "standard"
    # The DeepLabV3 head (models/head.py): MiB's (ft, joint, mib, plop, icd train it: no
    # dropout, pooled branch added, leaky ReLU, xavier init) or DKD's ASPP (deeplabv3: dropout
    # 0.1, a 3x3 conv, kaiming init); auto = DKD's with classifier dkd, MiB's otherwise.
    head: Literal["auto", "mib", "deeplabv3"] = "auto"


@dataclass(frozen=True)
class MethodConfig:
    """Which continual-learning method trains the incremental steps."""

    name: Literal["ft", "joint", "mib", "plop", "icd", "dkd"] = "icd"


@dataclass(frozen=True)
class ICDLossConfig:
    """ICD internal/external distillation (ICD_METHOD.md); every reconstructed choice is here."""

    lambda_int: float = non_negative(1.0, "a number >= 0")
    lambda_ext: float = non_negative(10.0, "a number >= 0")
    stats: tuple[
        Literal["mean", "std", "max", "spatial_mean", "spatial_std"], ...
    ] = ruled(("mean", "std", "max", "spatial_mean", "spatial_std"),
              lambda v: len(v) > 0 and len(set(v)) == len(v),
              "a non-empty list of distinct statistics")
    tau: float = positive(1.0, "a positive number")
    msca: Literal["fixed", "learned"] = "fixed"
    msca_kernels: tuple[int, ...] = ruled(
        (7, 11, 21), lambda v: len(v) > 0 and all(k > 0 and k % 2 == 1 for k in v),
        "a non-empty list of odd positive kernel sizes")
    # PLOP's adaptive factor sqrt(|C_0:t| / |C_t|) on the ICD terms.
    adaptive_factor: bool = True
    # Implementation of the losses: auto = the fused Triton kernels on CUDA, the compiled
    # fused path on CPU; eager = the readable reference (losses/icd.py). All give the same
    # values within the dtype's tolerance.
    impl: Literal["auto", "triton", "compiled", "eager"] = "auto"


@dataclass(frozen=True)
class PODLossConfig:
    """PLOP's Local POD and pseudo-labelling, as PLOP's train.py computes them (VOC factors;
    ADE20K: lambda_pod 0.001, lambda_pod_logits 0.00001)."""

    # Factor of each feature level's POD distance.
    lambda_pod: float = non_negative(0.01, "a number >= 0")
    # Factor of the logits level (replaces lambda_pod there; PLOP's switch.after.factor).
    lambda_pod_logits: float = non_negative(0.0005, "a number >= 0")
    scales: tuple[int, ...] = ruled((1, 2, 4), lambda v: len(v) > 0 and all(s > 0 for s in v),
                                    "a non-empty list of positive integers")
    # plop: PLOP's square regions of side W // scale (a remainder dropped); split: near-equal
    # parts covering every pixel.
    regions: Literal["plop", "split"] = "plop"
    # L2-normalise the pooled embeddings before the distance (PLOP: false).
    normalize: bool = False
    # Pseudo-label thresholds: plop = PLOP's find_median on its entropy() / log(seen) over
    # `bins` bins (its approximation as written); median = the exact histogram median of the
    # normalised entropy. Never below entropy_floor.
    thresholds: Literal["plop", "median"] = "plop"
    bins: int = positive(100, "a positive integer")
    entropy_floor: float = non_negative(0.001, "a number >= 0")


@dataclass(frozen=True)
class DKDLossConfig:
    """DKD (cvlab-yonsei/DKD trainer/trainer_voc.py, configs/config_voc.json, scripts/): the
    weights of its terms, pos_weight of the mBCE, and its recipe's optimiser and norm-layer
    settings (VOC values; the ADE20K configs set pos_weight 35). Step 0 trains mbce and ac."""

    mbce: float = non_negative(1.0, "a number >= 0")
    kd: float = non_negative(5.0, "a number >= 0")
    dkd_pos: float = non_negative(5.0, "a number >= 0")
    dkd_neg: float = non_negative(5.0, "a number >= 0")
    ac: float = non_negative(1.0, "a number >= 0")
    # pos_weight of the mBCE at step 0 (VOC scripts: INIT_POSWEIGHT=2) and at later steps
    # (config_voc.json: 1; config_ade.json: 35 at every step).
    pos_weight_step0: float = positive(2.0, "a positive number")
    pos_weight: float = positive(1.0, "a positive number")
    # Learning-rate factor of the head (ASPP) and the classifiers over the backbone's
    # (train_voc.py: lr * 10).
    head_lr_factor: float = positive(10.0, "a positive number")
    # Steps t > 0: normalisation layers frozen (statistics and affine weights) and dropout
    # off (--freeze_bn in every incremental step of its scripts).
    freeze_bn: bool = True


@dataclass(frozen=True)
class LossConfig:
    """Segmentation and distillation losses of the incremental steps (step 0 is plain CE)."""

    # auto = the method's own choice (ft/joint: ce; mib/icd: unbiased_ce; plop: pseudo_ce).
    seg: Literal["auto", "ce", "unbiased_ce", "pseudo_ce"] = "auto"
    # MiB unbiased knowledge distillation on logits; 0 turns it off.
    lambda_kd: float = non_negative(10.0, "a number >= 0")
    kd_alpha: float = positive(1.0, "a positive number")
    icd: ICDLossConfig = field(default_factory=ICDLossConfig)
    pod: PODLossConfig = field(default_factory=PODLossConfig)
    dkd: DKDLossConfig = field(default_factory=DKDLossConfig)


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation; lr/epochs apply to step 0, the *_incremental ones to later steps."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = positive(0.01, "a positive number")
    lr_incremental: float = positive(0.001, "a positive number")
    momentum: float = ruled(0.9, lambda v: 0 <= v < 1, "a number in [0, 1)")
    nesterov: bool = True
    weight_decay: float = non_negative(1e-4, "a number >= 0")
    poly_power: float = non_negative(0.9, "a number >= 0")
    # Global batch: gradient accumulation keeps it whatever the number of workers.
    batch_size: int = positive(24, "a positive integer")
    epochs: int = positive(30, "a positive integer")
    # None = same as epochs
    epochs_incremental: int | None = positive(None, "a positive integer or null")
    # When set, a fixed number of iterations replaces the epoch budget of step 0
    # (iterations) or of the later steps (iterations_incremental).
    iterations: int | None = positive(None, "a positive integer or null")
    iterations_incremental: int | None = positive(None, "a positive integer or null")


@dataclass(frozen=True)
class EngineConfig:
    """Distributed execution: Ray Train workers and the per-worker training engine."""

    engine: Literal["deepspeed", "ddp"] = "deepspeed"
    # ray: one Ray Train worker group trains every step of the schedule; local: the whole
    # schedule in the driver's process, one worker, no Ray (pdb works; tests of a method's
    # behaviour need no cluster), the same results as one Ray worker on the same seed.
    launcher: Literal["ray", "local"] = "ray"
    num_workers: int = positive(2, "a positive integer")
    # Per-worker batch; None = optim.batch_size / num_workers. Gradient accumulation makes up
    # the rest, so the global batch is optim.batch_size whatever the number of workers.
    micro_batch_size: int | None = positive(None, "a positive integer or null")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpus_per_worker: float = positive(1.0, "a positive number")
    gpus_per_worker: float = ruled(1.0, lambda v: 0 < v <= 1,
                                   "a number in (0, 1]: a worker trains on one GPU (or a share "
                                   "of one); use engine.num_workers for more GPUs")
    zero_stage: Literal[0, 1, 2] = 1  # DeepSpeed only; ddp ignores it
    # auto = bf16 on GPUs that support it, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # The teacher's weights: fp32 (its BatchNorm buffers too), run under the student's
    # autocast, as MiB/PLOP/DKD keep an fp32 teacher under AMP; bf16/fp16 cast the whole
    # teacher (half its memory, a slightly different teacher).
    teacher_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Student and images in channels_last memory format (often faster convolutions on GPUs
    # with tensor cores; tools/gpu_check.py measures it).
    channels_last: bool = False
    # Ray's placement of the workers over the nodes: PACK (as few nodes as fit, Ray Train's
    # default), SPREAD (over as many as possible), STRICT_SPREAD (one worker per node, or
    # wait for nodes), STRICT_PACK (all on one node).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Ray Train FailureConfig: how many worker-group failures a step survives.
    max_failures: int = ruled(0, lambda v: v >= -1, "an integer >= -1 (-1 = retry forever)")
    # After a node is lost, how long the run waits for another node to take its workers'
    # place (an autoscaler's, or one added by hand) before it stops with one line saying so.
    node_loss_timeout_s: float = positive(600.0, "a positive number of seconds")
    # Data-loading threads/processes per worker (DALI threads; torch uses data.loader_workers).
    dali_threads: int = positive(2, "a positive integer")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation during and after each step."""

    # 0 = only at the end of each step.
    every_n_epochs: int = non_negative(0, "an integer >= 0")
    batch_size: int = positive(8, "a positive integer")


@dataclass(frozen=True)
class LoggingConfig:
    """Console and W&B logging (the W&B key is read from the environment only)."""

    # None = WANDB_MODE from the environment, else offline.
    wandb: Literal["offline", "online", "disabled"] | None = None
    project: str = "icd_dist"
    entity: str | None = None
    log_every: int = positive(10, "a positive integer")
    num_overlays: int = non_negative(4, "an integer >= 0")
    # W&B group of the step runs; None = the run name (a sweep sets its own name).
    group: str | None = None


SPACE_KEY = "tune.space"
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint", "lograndint")
# Keys a sweep cannot search: its own settings, the run's identity, and the schedule (the
# sweep's schedules are tune.schedules).
UNSEARCHABLE = ("tune.", "run.", "task.")


@dataclass(frozen=True)
class SearchDim:
    """One dimension of a sweep: the config key `key` drawn from `distribution` over
    `values`: [low, high] for loguniform/uniform (floats) and randint/lograndint (integers,
    both ends included), the options for choice. Written in YAML as
    `{key: {distribution: values}}`."""

    key: str
    distribution: Literal["loguniform", "uniform", "choice", "randint", "lograndint"]
    values: tuple[Any, ...]


@dataclass(frozen=True)
class TuneConfig:
    """A Ray Tune sweep over incremental schedules (`python -m icd_dist.tune`)."""

    # Task names of the run's dataset (e.g. [6-5, 6-1]); empty = task.name alone.
    schedules: tuple[str, ...] = ()
    # Config key -> distribution, e.g. {loss.pod.lambda_pod: {loguniform: [0.001, 0.1]},
    # loss.seg: {choice: [unbiased_ce, pseudo_ce]}}; a key set to null is not searched;
    # "method" (or nothing) = the method's own space (its weights and optim.lr_incremental,
    # declared next to the method in methods/). Checked against this schema when
    # the config loads: the key exists, the distribution suits its type, every value
    # passes its rule.
    space: tuple[SearchDim, ...] = ()
    # random: num_samples weight sets, each run on every schedule; optuna: TPE proposes
    # num_samples (schedule, weights) trials.
    search: Literal["random", "optuna"] = "random"
    num_samples: int = positive(8, "a positive integer")
    # What a trial is judged by after its last step: all-mIoU, hIoU or old-class mIoU.
    metric: Literal["all", "hiou", "old"] = "all"
    # asha: per schedule, the incremental step is the time axis; none: every trial runs out.
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = positive(1, "a positive integer")
    reduction_factor: float = ruled(2.0, lambda v: v > 1, "a number > 1")
    # 0 = as many concurrent trials as the cluster fits.
    max_concurrent: int = non_negative(0, "an integer >= 0")
    # CPUs of a trial's driver (its TorchTrainers' workers take engine.cpus_per_worker each).
    trial_cpus: float = non_negative(0.05, "a number >= 0")
    max_failures: int = ruled(1, lambda v: v >= -1, "an integer >= -1 (-1 = retry forever)")
    seed: int = 0
    # true: the first trial runs this config's own values of the searched keys (e.g. a
    # method's shipped weights), so the sweep's best is never below what it started from.
    try_config_first: bool = False


@dataclass(frozen=True)
class Config:
    """The whole, validated configuration of one run. Its defaults are the protocol's
    (DESIGN.md, "Protocol decisions": VOC, SGD, lr 0.01 then 0.001, batch 24, crop 512, ...),
    defined here only; configs/ set what an experiment changes."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


def micro_batch_and_accumulation(cfg: Config) -> tuple[int, int]:
    """(per-worker micro-batch, gradient-accumulation steps) that make the global batch
    optim.batch_size with engine.num_workers workers."""
    batch, workers = cfg.optim.batch_size, cfg.engine.num_workers
    micro = cfg.engine.micro_batch_size or max(1, batch // workers)
    if batch % (micro * workers):
        raise ConfigError(
            "optim.batch_size", f"{batch} is not a multiple of engine.num_workers ({workers}) x "
            f"engine.micro_batch_size ({micro}); choose values whose product divides it")
    return micro, batch // (micro * workers)


def _cross_checks(cfg: Config) -> None:
    """Rules that relate several keys."""
    micro_batch_and_accumulation(cfg)
    if cfg.data.scale_min > cfg.data.scale_max:
        raise ConfigError(
            "data.scale_min",
            f"must be <= data.scale_max ({cfg.data.scale_min} > {cfg.data.scale_max})",
        )
    if cfg.engine.launcher == "local" and cfg.engine.num_workers != 1:
        raise ConfigError("engine.num_workers", "engine.launcher=local trains with one worker "
                          "in this process (a sweep: in each trial's process); set "
                          f"engine.num_workers=1 (got {cfg.engine.num_workers})")


# --------------------------------------------------------------------------------------
# Building typed values from plain data
# --------------------------------------------------------------------------------------


def _type_name(tp: Any, plural: bool = False) -> str:
    """How a schema type reads in an error message ("an integer", "a list of integers")."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        values = ", ".join(repr(a) for a in typing.get_args(tp))
        return f"values among {values}" if plural else f"one of {values}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a, plural) for a in typing.get_args(tp))
    if origin is tuple:
        inner = _type_name(typing.get_args(tp)[0], plural=True)
        return f"lists of {inner}" if plural else f"a list of {inner}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mappings" if plural else "a mapping"
    names = {int: ("an integer", "integers"), float: ("a number", "numbers"),
             bool: ("true or false", "booleans"), str: ("a string", "strings")}
    if tp in names:
        return names[tp][plural]
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """Convert plain YAML data to `tp`, or raise _Mismatch."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        for allowed in typing.get_args(tp):
            if value == allowed and type(value) is type(allowed):
                return value
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise _Mismatch
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp) for v in value)
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported schema type {tp!r}")


def _schema_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _rule(cls: type, name: str) -> tuple[Callable[[Any], bool], str] | None:
    """The value rule of field `name` of the schema class `cls` (ruled()), if it has one."""
    return next(f.metadata.get(RULE) for f in dataclasses.fields(cls) if f.name == name)


def _unknown_key_error(prefix: str, key: str, cls: type, source: str | None) -> ConfigError:
    allowed = list(_schema_fields(cls))
    full = f"{prefix}{key}"
    hint = difflib.get_close_matches(key, allowed, n=1)
    did_you_mean = f"; did you mean {prefix + hint[0]!r}?" if hint else ""
    where = f"'{prefix[:-1]}'" if prefix else "the top level"
    return ConfigError(
        full, f"unknown key; allowed keys at {where}: {', '.join(allowed)}{did_you_mean}", source
    )


def _build(cls: type, data: Mapping[str, Any], prefix: str, sources: Mapping[str, str]) -> Any:
    fields = _schema_fields(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise _unknown_key_error(prefix, str(key), cls, sources.get(full))
        tp = fields[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(full, f"expected a mapping of {tp.__name__} keys, got "
                                  f"{value!r}", sources.get(full))
            kwargs[key] = _build(tp, value, full + ".", sources)
            continue
        kwargs[key] = _typed_value(tp, _rule(cls, key), value, full, sources.get(full),
                                   sources)
    return cls(**kwargs)


def _typed_value(tp: Any, rule: tuple[Callable[[Any], bool], str] | None, value: Any,
                 full: str, source: str | None,
                 sources: Mapping[str, str] | None = None) -> Any:
    """`value` converted to the schema type `tp` of the key `full` and checked against the
    key's `rule`; a ConfigError naming the key otherwise."""
    if tp == tuple[SearchDim, ...]:
        return _search_space(value, full, sources or {})
    try:
        typed = _coerce(value, tp)
    except _Mismatch:
        raise ConfigError(full, f"expected {_type_name(tp)}, got {value!r}", source) from None
    if rule is not None and not rule[0](typed):
        raise ConfigError(full, f"must be {rule[1]}, got {value!r}", source)
    return typed


def config_from_dict(data: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> Config:
    """Build and validate a Config from nested plain data (missing keys take defaults).

    `sources` maps dotted keys to where they were set, for error messages."""
    if not isinstance(data, Mapping):
        raise ConfigError("", f"a config must be a mapping, got {type(data).__name__}")
    cfg = _build(Config, data, "", sources or {})
    _cross_checks(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain data (tuples as lists): YAML/JSON-ready, and
    `config_from_dict(config_to_dict(cfg)) == cfg`."""

    def plain(v: Any) -> Any:
        if isinstance(v, TuneConfig):
            return {**{f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)},
                    "space": {d.key: {d.distribution: plain(d.values)} for d in v.space}
                    if v.space else "method"}
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


# --------------------------------------------------------------------------------------
# The search space of a sweep (tune.space)
# --------------------------------------------------------------------------------------


def _search_space(value: Any, full: str, sources: Mapping[str, str]) -> tuple[SearchDim, ...]:
    """tune.space from plain data ("method", a mapping of config keys, flat or nested, to
    {distribution: values}) or from SearchDims, every dimension checked (check_search_dim)."""
    if value is None or value == "method":
        return ()
    if isinstance(value, Sequence) and not isinstance(value, str) and all(
            isinstance(d, SearchDim) for d in value):
        return tuple(check_search_dim(d, full) for d in value)
    if not isinstance(value, Mapping):
        raise ConfigError(full, f"expected \"method\" or a mapping of config keys to "
                          f"{{distribution: values}}, got {value!r}", sources.get(full))
    dims: dict[str, SearchDim] = {}

    def walk(node: Mapping[str, Any], key: str) -> None:
        for name, sub in node.items():
            child = f"{key}.{name}" if key else str(name)
            where = sources.get(f"{full}.{child}")
            if sub is None:  # null: not searched (still a config key)
                try:
                    _leaf(child)
                except ConfigError as exc:
                    raise ConfigError(f"{full}.{child}", f"not a config key: {exc.detail}",
                                      where) from None
                dims.pop(child, None)
                continue
            if isinstance(sub, Mapping) and sub and set(sub) <= set(DISTRIBUTIONS):
                if len(sub) != 1:
                    raise ConfigError(f"{full}.{child}", f"give one distribution, got "
                                      f"{', '.join(sub)}", where)
                ((distribution, values),) = sub.items()
                where = sources.get(f"{full}.{child}.{distribution}", where)
                if isinstance(values, str) or not isinstance(values, Sequence):
                    raise ConfigError(f"{full}.{child}", f"{distribution} takes a list, got "
                                      f"{values!r}", where)
                dims[child] = check_search_dim(SearchDim(child, distribution, tuple(values)),
                                               full, where)
            elif isinstance(sub, Mapping) and sub and not _is_leaf(child):
                walk(sub, child)
            else:
                try:
                    _leaf(child)
                except ConfigError as exc:
                    raise ConfigError(f"{full}.{child}", f"not a config key: {exc.detail}",
                                      where) from None
                raise ConfigError(f"{full}.{child}", "expected {distribution: values} with a "
                                  f"distribution among {', '.join(DISTRIBUTIONS)} (e.g. "
                                  f"{{loguniform: [0.01, 1.0]}}), got {sub!r}", where)

    walk(value, "")
    return tuple(dims.values())


def _is_leaf(key: str) -> bool:
    try:
        _leaf(key)
    except ConfigError:
        return False
    return True


def _leaf(key: str) -> tuple[Any, tuple[Callable[[Any], bool], str] | None]:
    """The schema type and value rule of the config key `key` (a ConfigError naming it if it
    is not one)."""
    node: Any = Config
    parts = key.split(".")
    rule = None
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(key, f"{'.'.join(parts[:i])} is {_type_name(node)}, not a section")
        fields = _schema_fields(node)
        if part not in fields:
            raise _unknown_key_error(".".join(parts[:i]) + "." if i else "", part, node, None)
        node, rule = fields[part], _rule(node, part)
    if dataclasses.is_dataclass(node):
        raise ConfigError(key, "is a section: search its keys one by one")
    return node, rule


def check_search_dim(dim: SearchDim, space_key: str = "tune.space",
                     source: str | None = None) -> SearchDim:
    """`dim` with its values typed as its config key's, or a ConfigError naming
    `{space_key}.{key}`: the key must exist and be searchable, the distribution suit the key's
    type (loguniform/uniform: a number; randint/lograndint: an integer; choice: any), ranges
    be [low, high] with low < high (low > 0 for the log ones), and every value pass the
    key's own rule."""
    name = f"{space_key}.{dim.key}"
    if dim.key.startswith(UNSEARCHABLE):
        raise ConfigError(name, f"a sweep cannot search {dim.key.split('.')[0]}.* keys (its "
                          "own settings, the run's identity and the schedule; the schedules "
                          "are tune.schedules)", source)
    try:
        tp, rule = _leaf(dim.key)
    except ConfigError as exc:
        raise ConfigError(name, f"not a config key: {exc.detail}", source) from None
    if dim.distribution not in DISTRIBUTIONS:
        raise ConfigError(name, f"unknown distribution {dim.distribution!r}; allowed: "
                          f"{', '.join(DISTRIBUTIONS)}", source)

    def typed(v: Any) -> Any:
        try:
            return _typed_value(tp, rule, v, dim.key, source)
        except ConfigError as exc:
            raise ConfigError(name, f"{exc.detail} ({dim.distribution} value)", source) from None

    if dim.distribution == "choice":
        if not dim.values:
            raise ConfigError(name, "choice needs at least one option", source)
        values = tuple(typed(v) for v in dim.values)
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(name, f"choice options repeat: {list(dim.values)}", source)
        return SearchDim(dim.key, dim.distribution, values)
    integer = dim.distribution in ("randint", "lograndint")
    if not (_accepts_int(tp) if integer else _accepts_float(tp)):
        use = "randint or lograndint" if not integer and _accepts_int(tp) else \
            "loguniform or uniform" if integer and _accepts_float(tp) else "choice"
        raise ConfigError(name, f"is {_type_name(tp)}: {dim.distribution} does not suit it; "
                          f"use {use}", source)
    try:
        if len(dim.values) != 2:
            raise _Mismatch
        bounds = [_coerce(v, int if integer else float) for v in dim.values]
    except _Mismatch:
        raise ConfigError(name, f"{dim.distribution} takes [low, high], two "
                          f"{'integers' if integer else 'numbers'}; got {list(dim.values)}",
                          source) from None
    low, high = (typed(v) for v in bounds)
    if not low < high:
        raise ConfigError(name, f"needs low < high, got [{low}, {high}] (to fix the value, set "
                          "the key itself, not a search dimension)", source)
    if dim.distribution.startswith("log") and low <= 0:
        raise ConfigError(name, f"{dim.distribution} needs low > 0, got {low}", source)
    return SearchDim(dim.key, dim.distribution, (low, high))


def _accepts_int(tp: Any) -> bool:
    try:
        return type(_coerce(3, tp)) is int
    except _Mismatch:
        return False


def _accepts_float(tp: Any) -> bool:
    try:
        return type(_coerce(0.5, tp)) is float
    except _Mismatch:
        return False


# --------------------------------------------------------------------------------------
# YAML files, composition and overrides
# --------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], update: Mapping[str, Any], sources: dict[str, str],
           source: str, prefix: str = "") -> dict[str, Any]:
    """Merge `update` into a copy of `base`, recording the source of every leaf it sets."""
    out = dict(base)
    for key, value in update.items():
        full = f"{prefix}{key}"
        if full == SPACE_KEY and isinstance(value, Mapping):
            value = nest_dotted(value)  # so that a later file or override wins key by key
        # a search dimension ({loguniform: [lo, hi]}) replaces the one before, not merges
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and \
                not (value and set(value) <= set(DISTRIBUTIONS)):
            out[key] = _merge(dict(out[key]), value, sources, source, full + ".")
        else:
            out[key] = value
            _record_sources(value, full, source, sources)
    return out


def nest_dotted(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """{"loss.icd.tau": v} as {"loss": {"icd": {"tau": v}}}, mappings merged key by key."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            value = nest_dotted(value)
        nested = _nest(str(key), value) if "." in str(key) else {key: value}
        out = _merge(out, nested, {}, "")
    return out


def _record_sources(value: Any, key: str, source: str, sources: dict[str, str]) -> None:
    sources[key] = source
    if isinstance(value, Mapping):
        for k, v in value.items():
            _record_sources(v, f"{key}.{k}", source, sources)


def _compose_file(path: Path, sources: dict[str, str], stack: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(BASES_KEY, f"config files extend each other in a cycle: {chain}")
    data = _read_yaml(path)
    bases = data.pop(BASES_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(BASES_KEY, f"expected a file name or a list of file names, got "
                          f"{bases!r}", str(path))
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = (path.parent / base)
        if not base_path.exists():
            raise ConfigError(BASES_KEY, f"base file {base!r} not found (looked at {base_path})",
                              str(path))
        merged = _merge(merged, _compose_file(base_path, sources, (*stack, path)), sources,
                        str(base_path.resolve()))
    return _merge(merged, data, sources, str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """Split a `dotted.key=value` override; the value is read as YAML (numbers, true/false,
    null, [lists]); anything else stays a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            "", f"override {text!r} is not of the form key=value (e.g. optim.lr=0.02)"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(key, "empty part in a dotted key")
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    return nested


def compose(path: str | Path | None, overrides: Sequence[str] = ()) -> tuple[dict[str, Any],
                                                                              dict[str, str]]:
    """The merged plain data of a config file (with its bases) and overrides, and where
    every key was set."""
    sources: dict[str, str] = {}
    data: dict[str, Any] = {}
    if path is not None:
        data = _compose_file(Path(path), sources, ())
    for text in overrides:
        key, value = parse_override(text)
        data = _merge(data, _nest(key, value), sources, f"override {text!r}")
    return data, sources


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load, compose and validate a config: YAML `path` (None = all defaults) with its bases,
    then the `key=value` overrides in order."""
    data, sources = compose(path, overrides)
    return config_from_dict(data, sources)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back to an equal Config)."""
    Path(path).write_text(dump_config(cfg))


def dump_config(cfg: Config) -> str:
    """The resolved config as a YAML document."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def update(cfg: Config, changes: Mapping[str, Any]) -> Config:
    """A new validated Config: `cfg` with the typed values `changes` ({"run.name": "x",
    "loss.icd.stats": (("std",),)}) set by dataclasses.replace; no text is parsed. A wrong key
    or a value of the wrong type is a ConfigError naming the key and what it allows."""
    for key, value in changes.items():
        cfg = _set(cfg, key.split("."), value, "")
    _cross_checks(cfg)
    return cfg


def value_at(cfg: Config, key: str) -> Any:
    """The value of the dotted config key `key` in `cfg` (a ConfigError naming it if it is not
    a key of the schema)."""
    _leaf(key)
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _set(node: Any, parts: list[str], value: Any, prefix: str) -> Any:
    """`node` (a config dataclass) with the field at the dotted path `parts` set to `value`."""
    fields = _schema_fields(type(node))
    name, full = parts[0], prefix + parts[0]
    if name not in fields:
        raise _unknown_key_error(prefix, name, type(node), None)
    tp = fields[name]
    if len(parts) > 1:
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(full, f"is {_type_name(tp)}, not a section with keys")
        new = _set(getattr(node, name), parts[1:], value, full + ".")
    else:
        if dataclasses.is_dataclass(tp):
            raise ConfigError(full, "is a section: set its keys one by one")
        new = _typed_value(tp, _rule(type(node), name), value, full, None)
    return dataclasses.replace(node, **{name: new})

"""Loading ImageNet weights into a backbone from a file the user names (never downloaded).

Formats recognised:
- torchvision: the state dict of torchvision's resnet18/50/101 or mobilenet_v3_large
  (keys conv1.*, layer1.0.*, ..., fc.* / features.*, classifier.*), possibly wrapped in
  {"state_dict": ...} or {"model": ...} and prefixed with "module.";
- in-place ABN (the ImageNet checkpoints of MiB and PLOP, e.g. resnet101_iabn_sync.pth.tar):
  {"state_dict": {"module.mod1.conv1.weight", "module.mod2.block1.convs.conv1.weight",
  "module.mod2.block1.proj_conv.weight", ...}}. Those networks were trained with
  leaky-ReLU(0.01) activations fused into their norm layers; here they run with ReLU, so
  the weights are a close initialisation, not an exact copy of that network.

`model.pretrained` names that file; null (not set) or the string "none" mean no file. VOC and
ADE20K runs need one (every published result starts from an ImageNet-pretrained ResNet):
`check_pretrained` stops such a run before anything starts unless the config says
`model.pretrained: none` on purpose.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from icd_dist.config import Config, ConfigError

NO_WEIGHTS = "none"  # model.pretrained: deliberately no ImageNet weights (train from scratch)
NEEDS_WEIGHTS = ("voc", "ade20k")  # data.dataset values whose runs need model.pretrained
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")
_IABN_BLOCK = re.compile(r"^mod([2-5])\.block(\d+)\.(.+)$")
_IABN_EPS = 1e-5


class PretrainedFormatError(ValueError):
    """A weights file whose format or contents do not fit the backbone; names the file."""


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedFormatError(f"{path}: not a state dict of tensors (got "
                                    f"{type(obj).__name__})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def _from_inplace_abn(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            continue
        if key.startswith("mod1."):
            new = key[len("mod1."):]
        else:
            m = _IABN_BLOCK.match(key)
            if m is None:
                raise PretrainedFormatError(f"unexpected in-place ABN key {key!r}")
            layer, block, rest = int(m.group(1)) - 1, int(m.group(2)) - 1, m.group(3)
            rest = (rest.replace("convs.", "", 1).replace("proj_conv", "downsample.0")
                    .replace("proj_bn", "downsample.1"))
            new = f"layer{layer}.{block}.{rest}"
        # In-place ABN normalises with |weight| + eps (its weights may be stored signed).
        if re.search(r"(bn\d|downsample\.1)\.weight$", new):
            value = value.abs() + _IABN_EPS
        out[new] = value
    return out


def detect_format(state: dict[str, torch.Tensor]) -> str:
    """'inplace_abn' or 'torchvision' from the keys of an (unwrapped) state dict."""
    if any(k.startswith("mod1.") for k in state) and any(k.startswith("mod2.") for k in state):
        return "inplace_abn"
    if "conv1.weight" in state or any(k.startswith("features.0.") for k in state):
        return "torchvision"
    raise PretrainedFormatError(
        "unknown weights format; expected a torchvision state dict (conv1.weight, "
        "layer1.0..., or features.0...) or an in-place ABN checkpoint (module.mod1..., "
        f"module.mod2.block1...); first keys: {list(state)[:5]}"
    )


def load_pretrained_backbone(backbone: nn.Module, path: str | Path, name: str = "") -> str:
    """Load ImageNet weights from `path` into `backbone` (classifier weights dropped).
    Returns the detected format; raises PretrainedFormatError naming the file and the first
    missing, unexpected or mis-shaped keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path} (model.pretrained)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = _unwrap(obj, path)
    try:
        fmt = detect_format(state)
        if fmt == "inplace_abn":
            state = _from_inplace_abn(state)
    except PretrainedFormatError as exc:
        raise PretrainedFormatError(f"{path}: {exc}") from None
    state = {k: v for k, v in state.items()
             if not k.startswith(_CLASSIFIER_PREFIXES) and not k.endswith("num_batches_tracked")}
    own = {k: v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mis_shaped:
        what = name or type(backbone).__name__
        raise PretrainedFormatError(
            f"{path} ({fmt} format) does not fit backbone {what}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(mis_shaped)} of another shape (e.g. {mis_shaped[:3]})"
        )
    backbone.load_state_dict(state, strict=False)
    return fmt


def pretrained_file(value: str | None) -> str | None:
    """The weights file that a model.pretrained value names; None for null, "" and "none"
    (any case): no ImageNet weights."""
    if value is None or not value.strip() or value.strip().lower() == NO_WEIGHTS:
        return None
    return value


def accepted_weights(backbone: str) -> str:
    """The weights files model.pretrained accepts, in words (for error messages)."""
    return (f"a torchvision ImageNet state dict of model.backbone={backbone} (e.g. "
            f"{backbone}-*.pth as torchvision publishes it) or MiB/PLOP's in-place-ABN ImageNet "
            "checkpoint (resnet101_iabn_sync.pth.tar, for resnet101)")


def check_pretrained(cfg: Config) -> None:
    """ConfigError on key model.pretrained, before anything trains, when a VOC or ADE20K run
    has no ImageNet weights (model.pretrained null; "none" says so on purpose), or when the
    file it names does not exist. Other datasets (CamVid, synthetic) train from scratch and
    are checked only for a named file that is missing."""
    value = cfg.model.pretrained
    path = pretrained_file(value)
    if path is None:
        if cfg.data.dataset in NEEDS_WEIGHTS and (value is None or not value.strip()):
            raise ConfigError(
                "model.pretrained",
                f"data.dataset={cfg.data.dataset} needs ImageNet weights for the backbone "
                "(every published VOC/ADE20K result starts from an ImageNet-pretrained "
                f"ResNet); name a file: {accepted_weights(cfg.model.backbone)}. Weights are "
                f"never downloaded. model.pretrained={NO_WEIGHTS} trains from scratch on "
                "purpose")
        return
    if not Path(path).is_file():  # as load_pretrained_backbone opens it
        raise ConfigError(
            "model.pretrained", f"weights file not found: {path} (expected "
            f"{accepted_weights(cfg.model.backbone)}; model.pretrained={NO_WEIGHTS} trains "
            "from scratch)")

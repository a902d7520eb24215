"""Continual-segmentation losses of the baselines, with the semantics of their authors' code:
MiB's unbiased CE and KD (fcdl94/MiB utils/loss.py), PLOP's Local POD, entropy thresholds and
pseudo-labels (arthurdouillard/CVPR2021_PLOP train.py), and PLOP's adaptive factor.

Logits are (N, C, H, W) in logit order: indices 0..num_old-1 are the classes seen before the
current step (0 = background), the rest are the current step's classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from icd_dist.css.classes import IGNORE_INDEX
from icd_dist.losses.precision import upcast

REDUCTIONS = ("mean", "sum", "none")
POD_REGIONS = ("plop", "split")
THRESHOLD_MODES = ("plop", "median")


def adaptive_factor(num_seen: int, num_new: int) -> float:
    """PLOP's factor sqrt(|C_0:t| / |C_t|) that scales distillation with the old/new ratio."""
    if num_new <= 0 or num_seen < num_new:
        raise ValueError(f"need 0 < num_new <= num_seen, got {num_new}, {num_seen}")
    return math.sqrt(num_seen / num_new)


def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        # the mean over non-ignored pixels, as F.cross_entropy(ignore_index=...)
        return loss.sum() / valid.sum().clamp(min=1)
    raise ValueError(f"unknown reduction {reduction!r}; allowed: {', '.join(REDUCTIONS)}")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                  ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """Per-pixel cross-entropy in float32, ignored pixels 0; reductions as
    unbiased_cross_entropy (mean = over non-ignored pixels, as torch's)."""
    loss = F.cross_entropy(upcast(logits), labels.long(), ignore_index=ignore_index,
                           reduction="none")
    return _reduce(loss, labels != ignore_index, reduction)


def unbiased_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, num_old_classes: int,
                           ignore_index: int = IGNORE_INDEX,
                           reduction: str = "mean") -> torch.Tensor:
    """MiB's unbiased cross-entropy: a pixel labelled background may be any old class, so its
    log-probability is log sum_{c < num_old} p_c; pixels of a new class score log p_c as usual.
    Labels below num_old_classes count as background. Equals plain CE when num_old_classes == 1.
    Reductions as MiB's (torch's nll_loss): mean over non-ignored pixels, sum, or none (per
    pixel, ignored pixels 0). Computed in float32 whatever the logits' dtype."""
    if not 1 <= num_old_classes <= logits.shape[1]:
        raise ValueError(f"num_old_classes must be in 1..{logits.shape[1]}, got {num_old_classes}")
    logits = upcast(logits)
    den = torch.logsumexp(logits, dim=1)  # (N, H, W)
    log_bg = torch.logsumexp(logits[:, :num_old_classes], dim=1) - den
    log_p = logits - den.unsqueeze(1)
    valid = labels != ignore_index
    target = torch.where(valid & (labels >= num_old_classes), labels, torch.zeros_like(labels))
    picked = log_p.gather(1, target.unsqueeze(1).long()).squeeze(1)
    log_prob = torch.where(target == 0, log_bg, picked)
    loss = torch.where(valid, -log_prob, torch.zeros_like(log_prob))
    return _reduce(loss, valid, reduction)


def unbiased_kd(new_logits: torch.Tensor, old_logits: torch.Tensor,
                mask: torch.Tensor | None = None, alpha: float = 1.0,
                reduction: str = "mean") -> torch.Tensor:
    """MiB's unbiased knowledge distillation: the old model's softmax (its logits scaled by
    alpha) against the new model's probabilities, where the new model's background is
    background + every new class. Per pixel:
        -(1/C_old) * [q_0 log(p_0 + sum_new p_c) + sum_{0 < c < C_old} q_c log p_c]
    `mask` (N, H, W) keeps only some pixels (others count 0); mean is over all pixels, as MiB."""
    num_old = old_logits.shape[1]
    if new_logits.shape[1] < num_old:
        raise ValueError(f"new model has {new_logits.shape[1]} logits, old model {num_old}")
    new_logits = upcast(new_logits)
    q = torch.softmax(upcast(old_logits) * alpha, dim=1)
    den = torch.logsumexp(new_logits, dim=1)
    bg_and_new = torch.cat([new_logits[:, :1], new_logits[:, num_old:]], dim=1)
    log_p_bg = torch.logsumexp(bg_and_new, dim=1) - den
    log_p_old = new_logits[:, 1:num_old] - den.unsqueeze(1)
    per_pixel = (q[:, 0] * log_p_bg + (q[:, 1:] * log_p_old).sum(dim=1)) / num_old
    loss = -per_pixel
    if mask is not None:
        loss = loss * mask.to(loss.dtype)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}; allowed: {', '.join(REDUCTIONS)}")


# --------------------------------------------------------------------------------------
# PLOP: Local POD
# --------------------------------------------------------------------------------------


def _regions(x: torch.Tensor, scale: int, regions: str) -> list[torch.Tensor]:
    """The scale x scale regions of x (..., H, W), row by row.

    plop: PLOP's _local_pod: square windows of side k = W // scale on both axes, so a
    remainder of W (and of H past scale * k) is dropped; split: H and W each cut into `scale`
    near-equal parts that cover every pixel."""
    if regions == "split":
        return [r for rows in torch.tensor_split(x, scale, dim=-2)
                for r in torch.tensor_split(rows, scale, dim=-1)]
    if regions != "plop":
        raise ValueError(f"unknown POD regions {regions!r}; allowed: {', '.join(POD_REGIONS)}")
    h, w = x.shape[-2:]
    k = w // scale
    if k == 0 or scale * k > h:
        raise ValueError(f"PLOP's Local POD regions (side W // {scale} = {k} on both axes) do "
                         f"not fit a {h}x{w} map; use loss.pod.regions=split for such maps")
    return [x[..., i * k:(i + 1) * k, j * k:(j + 1) * k]
            for i in range(scale) for j in range(scale)]


def local_pod_embedding(x: torch.Tensor, scales: Sequence[int] = (1, 2, 4),
                        regions: str = "plop") -> torch.Tensor:
    """PLOP's Local POD embedding of one level, per sample: the squared activations of each
    region averaged over its width, then over its height, for every region of every scale,
    concatenated (float32 at least)."""
    x = upcast(x).pow(2)
    parts = []
    for scale in scales:
        for region in _regions(x, scale, regions):
            if region.numel() == 0:  # only with regions=split on maps finer than the scale
                continue
            parts.append(region.mean(dim=3).flatten(1))
            parts.append(region.mean(dim=2).flatten(1))
    return torch.cat(parts, dim=1)


def local_pod_distance(new: torch.Tensor, old: torch.Tensor,
                       scales: Sequence[int] = (1, 2, 4), regions: str = "plop",
                       normalize: bool = False) -> torch.Tensor:
    """PLOP's Local POD between two feature maps of one level: the Frobenius norm of the
    difference of the raw embeddings, per sample, averaged over the batch (PLOP forces
    normalize=False; `normalize=True` L2-normalises each embedding first, a variant)."""
    if new.shape != old.shape:
        raise ValueError(f"feature shapes differ: {tuple(new.shape)} vs {tuple(old.shape)}")
    a = local_pod_embedding(new, scales, regions)
    b = local_pod_embedding(old, scales, regions)
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return (a - b).norm(dim=1).mean()


def local_pod(feats_new: Sequence[torch.Tensor], feats_old: Sequence[torch.Tensor],
              scales: Sequence[int] = (1, 2, 4)) -> torch.Tensor:
    """Mean over levels of PLOP's raw Local POD distance (PLOP's features_distillation with
    collapse_channels='local', pod_factor=1, no schedule, on these levels)."""
    if len(feats_new) != len(feats_old) or not feats_new:
        raise ValueError(f"need the same non-zero number of levels, got {len(feats_new)} "
                         f"and {len(feats_old)}")
    return torch.stack([local_pod_distance(a, b, scales)
                        for a, b in zip(feats_new, feats_old, strict=True)]).mean()


def sum_new_into_background(new_logits: torch.Tensor, num_old: int) -> torch.Tensor:
    """The new model's logits with the new classes' logits summed into background (PLOP's
    'extra_channels: sum'), so they line up with the old model's num_old logits."""
    merged = new_logits[:, :num_old].clone()
    merged[:, 0] = new_logits[:, 0] + new_logits[:, num_old:].sum(dim=1)
    return merged


def plop_pod(feats_new: Sequence[torch.Tensor], feats_old: Sequence[torch.Tensor],
             logits_new: torch.Tensor, logits_old: torch.Tensor, lambda_pod: float = 0.01,
             lambda_pod_logits: float = 0.0005, scales: Sequence[int] = (1, 2, 4),
             regions: str = "plop", normalize: bool = False) -> torch.Tensor:
    """PLOP's whole POD term without its sqrt(seen / new) factor:
        (lambda_pod * sum_l POD(f_l) + lambda_pod_logits * POD(logits)) / (L + 1)
    over the L feature levels and the logits at the head's resolution (before upsampling),
    the new model's new-class logits summed into its background. The logits' factor replaces
    the features' one for that level (PLOP's pod_options switch.after.factor)."""
    if len(feats_new) != len(feats_old) or not feats_new:
        raise ValueError(f"need the same non-zero number of levels, got {len(feats_new)} "
                         f"and {len(feats_old)}")
    terms = [lambda_pod * local_pod_distance(a, b, scales, regions, normalize)
             for a, b in zip(feats_new, feats_old, strict=True)]
    merged = sum_new_into_background(logits_new, logits_old.shape[1])
    terms.append(lambda_pod_logits * local_pod_distance(merged, logits_old, scales, regions,
                                                        normalize))
    return torch.stack(terms).sum() / len(terms)


# --------------------------------------------------------------------------------------
# PLOP: entropy thresholds and pseudo-labels
# --------------------------------------------------------------------------------------


def plop_entropy(probs: torch.Tensor) -> torch.Tensor:
    """PLOP's `entropy()`: -(1 / log C) * mean over the C classes of p log(p + 1e-8), per
    pixel (a mean, not a sum, so it lies in [0, 1/C])."""
    factor = 1.0 / math.log(probs.shape[1] + 1e-8)
    return -factor * torch.mean(probs * torch.log(probs + 1e-8), dim=1)


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the class distribution of every pixel divided by log(C): in [0, 1]
    (the `median` threshold variant's scale)."""
    num_classes = probs.shape[1]
    ent = -(probs * torch.log(probs.clamp(min=1e-12))).sum(dim=1)
    return ent / math.log(num_classes) if num_classes > 1 else torch.zeros_like(ent)


def pseudo_entropy(probs: torch.Tensor, num_seen_classes: int, mode: str = "plop"
                   ) -> torch.Tensor:
    """The per-pixel uncertainty that is compared with the thresholds: plop = PLOP's
    entropy() / log(number of seen classes) (its `max_entropy`); median = normalized_entropy."""
    if mode == "plop":
        return plop_entropy(probs) / math.log(num_seen_classes)
    if mode == "median":
        return normalized_entropy(probs)
    raise ValueError(f"unknown threshold mode {mode!r}; allowed: {', '.join(THRESHOLD_MODES)}")


def plop_median(counts: torch.Tensor) -> torch.Tensor:
    """PLOP's find_median approximation of the median of one class's histogram (int64
    counts over `bins` bins of [0, 1)), as written: the running sum that locates the median
    bin adds each bin's index (not its count), and the value is read linearly inside the bin
    where half the count falls between that running sum and the running sum plus the bin's
    count. Without such a bin the last bin is used with the whole running sum. Computed in
    float32 as PLOP (an empty bin can give inf or nan, as there). Returns a 0-d float32."""
    bins = counts.numel()
    counts = counts.to(torch.int64).cpu()
    half = counts.sum() / 2  # int64 / 2 -> float32, as PLOP
    running_sum = 0.0
    lower_border, bin_index = 0.0, 0
    for lb in range(bins):
        lower_border = lb / bins
        bin_index = int(lower_border * bins)  # PLOP's float round trip (e.g. 29 -> 28)
        if half >= running_sum and half <= running_sum + counts[bin_index]:
            break
        running_sum += lower_border * bins
    return lower_border + ((half - running_sum) / counts[bin_index]) * (1 / bins)


def exact_median(counts: torch.Tensor) -> float:
    """The median of a histogram over [0, 1) (linear inside the median bin); 0 when empty
    (the `median` threshold variant)."""
    bins = counts.numel()
    counts = counts.double().cpu()
    total = counts.sum()
    if total <= 0:
        return 0.0
    cum = counts.cumsum(0)
    half = total / 2
    b = int(torch.searchsorted(cum, half).item())
    before = cum[b - 1] if b > 0 else 0.0
    within = (half - before) / counts[b] if counts[b] > 0 else 0.0
    return (b + float(within)) / bins


class EntropyHistogram:
    """Per seen class, a histogram of the old model's uncertainty (pseudo_entropy) on the
    pixels labelled background, by the class it predicts there. Filled over the training set
    of the step before training it (PLOP's find_median); its medians are the thresholds."""

    def __init__(self, num_seen_classes: int, bins: int = 100, mode: str = "plop",
                 device: str | torch.device = "cpu"):
        if mode not in THRESHOLD_MODES:
            raise ValueError(f"unknown threshold mode {mode!r}; allowed: "
                             f"{', '.join(THRESHOLD_MODES)}")
        self.num_seen_classes = num_seen_classes
        self.bins = bins
        self.mode = mode
        self.counts = torch.zeros(num_seen_classes, bins, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, old_logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add the background-labelled pixels (label 0) of a batch; old_logits (N, C_old, H, W)
        at the labels' size."""
        probs = torch.softmax(upcast(old_logits), dim=1)
        pred = probs.argmax(dim=1)
        value = pseudo_entropy(probs, self.num_seen_classes, self.mode)
        background = labels == 0
        cls = pred[background]
        # PLOP clamps only the top; its entropy's 1e-8 can make a value a hair below 0,
        # which truncates to bin 0 all the same.
        bin_idx = (value[background] * self.bins).long().clamp(0, self.bins - 1)
        flat = cls * self.bins + bin_idx
        self.counts += torch.bincount(flat, minlength=self.counts.numel()).view_as(
            self.counts).to(self.counts.device)

    def all_reduce(self) -> EntropyHistogram:
        """Sum the histogram over the workers of the default process group (in place).
        PLOP computes its medians on each process's share of the data; summing first makes
        every worker use the thresholds of the whole training set."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)
        return self

    def thresholds(self, floor: float = 0.001) -> torch.Tensor:
        """Per seen class, float32: plop = PLOP's find_median value, then max(value, floor) as
        Python's max computes it (a nan median stays nan: that class is never confident);
        median = the exact histogram median, at least `floor`. A class the old model never
        predicted gets `floor`."""
        out = torch.zeros(self.num_seen_classes, dtype=torch.float32)
        for c in range(self.num_seen_classes):
            if self.counts[c].sum() <= 0:
                value = 0.0
            elif self.mode == "plop":
                value = plop_median(self.counts[c])
            else:
                value = exact_median(self.counts[c])
            out[c] = max(value, floor)
        return out


@torch.no_grad()
def plop_thresholds(old_logits: torch.Tensor, labels: torch.Tensor, num_seen_classes: int,
                    bins: int = 100, floor: float = 0.001) -> torch.Tensor:
    """PLOP's per-class entropy thresholds (find_median, mode 'entropy') from one batch (or
    batches concatenated): float32 tensor of num_seen_classes entries."""
    hist = EntropyHistogram(num_seen_classes, bins, "plop", device=old_logits.device)
    hist.update(old_logits, labels)
    return hist.thresholds(floor)


@torch.no_grad()
def pseudo_label(labels: torch.Tensor, old_logits: torch.Tensor, thresholds: torch.Tensor,
                 num_seen_classes: int, mode: str = "plop"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """PLOP's pseudo-labels (pseudo='entropy'): on pixels labelled with an old class (in
    practice background), the old model's class where its uncertainty is below that class's
    threshold, else 255 (ignored). Returns the new labels and PLOP's per-image
    classification factor: confident background pixels / (background pixels + 1e-6)."""
    num_old = old_logits.shape[1]
    probs = torch.softmax(upcast(old_logits), dim=1)
    pred = probs.argmax(dim=1)
    confident = pseudo_entropy(probs, num_seen_classes, mode) < thresholds.to(probs.device)[pred]
    background = labels < num_old
    out = labels.clone()
    out[background & ~confident] = IGNORE_INDEX
    out[background & confident] = pred[background & confident].to(out.dtype)
    num = (background & confident).float().sum(dim=(1, 2))
    den = background.float().sum(dim=(1, 2))
    return out, num / (den + 1e-6)


def pseudo_label_cross_entropy(logits: torch.Tensor, pseudo_labels: torch.Tensor,
                               image_weights: torch.Tensor) -> torch.Tensor:
    """PLOP's segmentation loss on pseudo-labels: per-pixel CE (0 on ignored pixels), each
    image weighted by its classification factor, averaged over all pixels."""
    ce = cross_entropy(logits, pseudo_labels, reduction="none")
    return (ce * image_weights.view(-1, 1, 1)).mean()

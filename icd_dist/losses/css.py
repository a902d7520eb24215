"""Continual-segmentation losses of the baselines: MiB's unbiased CE and KD, PLOP's Local POD
and pseudo-labelling, and PLOP's adaptive factor.

Logits are (N, C, H, W) in logit order: indices 0..num_old-1 are the classes seen before the
current step (0 = background), the rest are the current step's classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from icd_dist.losses.precision import upcast

IGNORE_INDEX = 255


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
    raise ValueError(f"unknown reduction {reduction!r}; allowed: mean, sum, none")


def unbiased_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, num_old_classes: int,
                           ignore_index: int = IGNORE_INDEX,
                           reduction: str = "mean") -> torch.Tensor:
    """MiB's unbiased cross-entropy: a pixel labelled background may be any old class, so its
    log-probability is log sum_{c < num_old} p_c; pixels of a new class score log p_c as usual.
    Labels below num_old_classes count as background. Equals plain CE when num_old_classes == 1.
    Computed in float32 whatever the logits' dtype."""
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
    raise ValueError(f"unknown reduction {reduction!r}; allowed: mean, sum, none")


def _local_pod_embedding(x: torch.Tensor, scales: tuple[int, ...]) -> torch.Tensor:
    """Width- and height-pooled squared activations over a pyramid of regions, per sample.
    A scale finer than the map yields empty regions; they are skipped."""
    x = upcast(x).pow(2)
    parts = []
    for scale in scales:
        for rows in torch.tensor_split(x, scale, dim=2):
            for region in torch.tensor_split(rows, scale, dim=3):
                if region.numel() == 0:
                    continue
                parts.append(region.mean(dim=3).flatten(1))  # pooled over width
                parts.append(region.mean(dim=2).flatten(1))  # pooled over height
    return torch.cat(parts, dim=1)


def local_pod_distance(new: torch.Tensor, old: torch.Tensor,
                       scales: tuple[int, ...] = (1, 2, 4)) -> torch.Tensor:
    """PLOP's Local POD between two feature maps of one level: the L2 distance between the
    L2-normalised local POD embeddings, averaged over the batch.

    Regions split H and W separately into `scale` near-equal parts covering every pixel
    (PLOP's code splits both by W // scale and drops the remainder)."""
    if new.shape != old.shape:
        raise ValueError(f"feature shapes differ: {tuple(new.shape)} vs {tuple(old.shape)}")
    a = F.normalize(_local_pod_embedding(new, scales), dim=1)
    b = F.normalize(_local_pod_embedding(old, scales), dim=1)
    return (a - b).norm(dim=1).mean()


def local_pod(feats_new: list[torch.Tensor], feats_old: list[torch.Tensor],
              scales: tuple[int, ...] = (1, 2, 4)) -> torch.Tensor:
    """Local POD over feature levels: the mean over levels of local_pod_distance."""
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


def local_pod_logits(new_logits: torch.Tensor, old_logits: torch.Tensor,
                     scales: tuple[int, ...] = (1, 2, 4)) -> torch.Tensor:
    """Local POD on the logits, the new classes summed into the background first (PLOP)."""
    return local_pod_distance(sum_new_into_background(new_logits, old_logits.shape[1]),
                              old_logits, scales)


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the class distribution of every pixel divided by log(C): in [0, 1].
    (PLOP uses a mean instead of the sum and rescales twice; the order of pixels, and so the
    per-class medians used as thresholds, is the same.)"""
    num_classes = probs.shape[1]
    ent = -(probs * torch.log(probs.clamp(min=1e-12))).sum(dim=1)
    return ent / math.log(num_classes) if num_classes > 1 else torch.zeros_like(ent)


class EntropyHistogram:
    """Per old class, a histogram of the normalised entropy of the old model on the pixels it
    predicts as that class among the pixels labelled background. Filled over the training set
    of the step before training it; its medians are PLOP's pseudo-label thresholds."""

    def __init__(self, num_old_classes: int, bins: int = 100, device: str | torch.device = "cpu"):
        self.num_old_classes = num_old_classes
        self.bins = bins
        self.counts = torch.zeros(num_old_classes, bins, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, old_logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add the background-labelled pixels of a batch (old_logits (N, C_old, H, W))."""
        probs = torch.softmax(upcast(old_logits), dim=1)
        pred = probs.argmax(dim=1)
        ent = normalized_entropy(probs)
        background = labels == 0
        cls = pred[background]
        bin_idx = (ent[background] * self.bins).long().clamp(0, self.bins - 1)
        flat = cls * self.bins + bin_idx
        self.counts += torch.bincount(flat, minlength=self.counts.numel()).view_as(
            self.counts).to(self.counts.device)

    def all_reduce(self) -> EntropyHistogram:
        """Sum the histogram over the workers of the default process group (in place).
        PLOP computes its medians on one process; summing first makes every worker use the
        thresholds of the whole training set."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)
        return self

    def thresholds(self, floor: float = 0.001) -> torch.Tensor:
        """Per old class, the median normalised entropy (linear inside the median bin), never
        below `floor`; a class the old model never predicted gets `floor`."""
        out = torch.full((self.num_old_classes,), floor, dtype=torch.float32)
        counts = self.counts.double().cpu()
        for c in range(self.num_old_classes):
            total = counts[c].sum()
            if total <= 0:
                continue
            cum = counts[c].cumsum(0)
            half = total / 2
            b = int(torch.searchsorted(cum, half).item())
            before = cum[b - 1] if b > 0 else 0.0
            within = (half - before) / counts[c, b] if counts[c, b] > 0 else 0.0
            median = (b + float(within)) / self.bins
            out[c] = max(median, floor)
        return out


@torch.no_grad()
def pseudo_label(labels: torch.Tensor, old_logits: torch.Tensor,
                 thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PLOP's pseudo-labels: on pixels labelled background, the old model's class where its
    normalised entropy is below that class's threshold, else 255 (ignored). Returns the new
    labels and the per-image weight: the fraction of background pixels that got a confident
    pseudo-label (shape (N,))."""
    probs = torch.softmax(upcast(old_logits), dim=1)
    pred = probs.argmax(dim=1)
    ent = normalized_entropy(probs)
    confident = ent < thresholds.to(ent.device)[pred]
    background = labels == 0
    out = labels.clone()
    out[background & ~confident] = IGNORE_INDEX
    out[background & confident] = pred[background & confident].to(out.dtype)
    num = (background & confident).float().flatten(1).sum(dim=1)
    den = background.float().flatten(1).sum(dim=1)
    return out, num / (den + 1e-6)


def pseudo_label_cross_entropy(logits: torch.Tensor, pseudo_labels: torch.Tensor,
                               image_weights: torch.Tensor) -> torch.Tensor:
    """PLOP's segmentation loss on pseudo-labels: per-pixel CE (0 on ignored pixels), each
    image weighted by its confident fraction, averaged over all pixels."""
    ce = F.cross_entropy(upcast(logits), pseudo_labels.long(), ignore_index=IGNORE_INDEX,
                         reduction="none")
    return (ce * image_weights.view(-1, 1, 1)).mean()

"""ft: fine-tuning, the lower bound: CE on the step's labels, a randomly initialised new
head."""

from __future__ import annotations

from icd_dist.methods.base import Method


class FineTuning(Method):
    """Fine-tuning: CE on the step's labels, a randomly initialised new head (lower bound)."""

    name = "ft"
    allowed_seg = ("ce",)
    uses_teacher = False
    default_mib_init = False

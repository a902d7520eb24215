"""The accumulation dtype of the losses."""

import torch


def upcast(t: torch.Tensor) -> torch.Tensor:
    """`t` in its accumulation dtype: float64 stays float64 (reference checks), every other
    floating dtype (bf16, fp16, fp32) becomes float32."""
    return t if t.dtype == torch.float64 else t.float()

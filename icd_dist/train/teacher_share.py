"""Sharing the frozen teacher across the workers of a step through the Ray object store.

The driver puts the previous step's fp32 weights ONCE (as numpy arrays). On CPU every
worker on a node maps the same shared-memory arrays and builds its teacher on them without
copying (the model is constructed on the meta device and the arrays are assigned as its
tensors); on GPU each worker copies them to its device once, in the inference dtype. The
teacher is never wrapped by DDP or DeepSpeed and never read from disk by a worker.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from icd_dist.models.deeplab import build_model
from icd_dist.models.teacher import freeze


def state_to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A state dict as contiguous numpy arrays (what goes into the object store)."""
    return {k: v.detach().cpu().contiguous().numpy() for k, v in state.items()}


def put_teacher(state: Mapping[str, torch.Tensor]):
    """Put the teacher's weights in the Ray object store once; returns the ObjectRef."""
    import ray

    return ray.put(state_to_numpy(state))


def fetch_teacher_arrays(ref_or_arrays) -> dict[str, np.ndarray]:
    """The teacher's arrays: ray.get of an ObjectRef (zero-copy, read-only on CPU), or the
    arrays themselves."""
    if isinstance(ref_or_arrays, dict):
        return ref_or_arrays
    import ray

    return ray.get(ref_or_arrays)


def shared_tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Tensors that ARE `arrays` (no copy; read-only shared memory from the object store:
    nothing may write to them, load_state_dict copies out of them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {k: torch.from_numpy(v) for k, v in arrays.items()}


def build_teacher(arrays: Mapping[str, np.ndarray], model_cfg, classes_per_step: Sequence[int],
                  device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """The frozen teacher built on `arrays`. On CPU without a dtype change its tensors ARE the
    shared arrays (no copy); otherwise they are copied once to `device` / `dtype`."""
    with torch.device("meta"):
        model = build_model(model_cfg, classes_per_step, load_pretrained=False)
    tensors = shared_tensors(arrays)  # the teacher never writes to its weights
    if device.type != "cpu" or (dtype is not None and dtype != torch.float32):
        tensors = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                   for k, v in tensors.items()}
    model.load_state_dict(tensors, assign=True)
    return freeze(model)


def shares_memory_with(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> bool:
    """Whether every parameter of `model` is a view of the corresponding array (zero-copy)."""
    for name, p in model.state_dict().items():
        if name in arrays and p.data_ptr() != arrays[name].__array_interface__["data"][0]:
            return False
    return True

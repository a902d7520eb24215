"""Fused ICD losses: the feature moments of one read per tensor (moments.py), computed by
Triton kernels on CUDA (triton_moments.py) or by a torch.compile'd torch path on CPU, and the
dispatch between them and the eager reference (dispatch.py)."""

"""Triton kernels for the feature moments (see moments.py): the forward reads f once and
writes the channel partials of its pixel block and the complete pixel moments; the backward
reads f once more and writes its gradient once.

Any shape, any strides (NCHW, channels_last, non-contiguous views): the kernels address f
through its four strides. Inputs fp32/bf16/fp16 accumulate in fp32 (fp64 in fp64, for the
reference checks). On a CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from icd_dist.losses.kernels.moments import Moments

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@triton.jit
def _moments_forward_kernel(
    f_ptr, stride_b, stride_c, stride_h, stride_w,
    num_channels, num_pixels, width, num_pixel_blocks,
    channel_shift_ptr, part_sum_ptr, part_sumsq_ptr, part_max_ptr, part_count_ptr,
    pixel_shift_ptr, pixel_sum_ptr, pixel_sumsq_ptr,
    ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program: sample b, pixels [pb * BLOCK_P, (pb + 1) * BLOCK_P), every channel.
    b = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < num_pixels
    pixel_offset = ((offs_p // width).to(tl.int64) * stride_h
                    + (offs_p % width).to(tl.int64) * stride_w)
    base = f_ptr + b * stride_b
    shift_p = tl.load(base + pixel_offset, mask=mask_p, other=0.0).to(ACC_DTYPE)
    pixel_sum = tl.zeros([BLOCK_P], dtype=ACC_DTYPE)
    pixel_sumsq = tl.zeros([BLOCK_P], dtype=ACC_DTYPE)
    for c0 in range(0, num_channels, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < num_channels
        channel_offset = offs_c.to(tl.int64) * stride_c
        shift_c = tl.load(base + channel_offset, mask=mask_c, other=0.0).to(ACC_DTYPE)
        mask = mask_c[:, None] & mask_p[None, :]
        x = tl.load(base + channel_offset[:, None] + pixel_offset[None, :], mask=mask,
                    other=0.0).to(ACC_DTYPE)
        d_p = tl.where(mask, x - shift_p[None, :], 0.0)
        pixel_sum += tl.sum(d_p, axis=0)
        pixel_sumsq += tl.sum(d_p * d_p, axis=0)
        d_c = tl.where(mask, x - shift_c[:, None], 0.0)
        block_max = tl.max(tl.where(mask, x, float("-inf")), axis=1)
        block_count = tl.sum((mask & (x == block_max[:, None])).to(tl.int32), axis=1)
        out = (b * num_pixel_blocks + pb) * num_channels + offs_c
        tl.store(part_sum_ptr + out, tl.sum(d_c, axis=1), mask=mask_c)
        tl.store(part_sumsq_ptr + out, tl.sum(d_c * d_c, axis=1), mask=mask_c)
        tl.store(part_max_ptr + out, block_max, mask=mask_c)
        tl.store(part_count_ptr + out, block_count, mask=mask_c)
        if pb == 0:
            tl.store(channel_shift_ptr + b * num_channels + offs_c, shift_c, mask=mask_c)
    tl.store(pixel_shift_ptr + b * num_pixels + offs_p, shift_p, mask=mask_p)
    tl.store(pixel_sum_ptr + b * num_pixels + offs_p, pixel_sum, mask=mask_p)
    tl.store(pixel_sumsq_ptr + b * num_pixels + offs_p, pixel_sumsq, mask=mask_p)


@triton.jit
def _moments_backward_kernel(
    f_ptr, stride_b, stride_c, stride_h, stride_w,
    grad_ptr, gstride_b, gstride_c, gstride_h, gstride_w,
    num_channels, num_pixels, width,
    channel_shift_ptr, g_csum_ptr, g_csq_ptr, channel_max_ptr, g_max_each_ptr,
    pixel_shift_ptr, g_psum_ptr, g_psq_ptr,
    ACC_DTYPE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program: one (channel block, pixel block) tile of sample b.
    b = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < num_pixels
    mask_c = offs_c < num_channels
    mask = mask_c[:, None] & mask_p[None, :]
    h = (offs_p // width).to(tl.int64)
    w = (offs_p % width).to(tl.int64)
    c = offs_c.to(tl.int64)
    pixel_offset = h * stride_h + w * stride_w
    x = tl.load(f_ptr + b * stride_b + c[:, None] * stride_c + pixel_offset[None, :],
                mask=mask, other=0.0).to(ACC_DTYPE)
    ch = b * num_channels + offs_c
    px = b * num_pixels + offs_p
    shift_c = tl.load(channel_shift_ptr + ch, mask=mask_c, other=0.0)
    g_csum = tl.load(g_csum_ptr + ch, mask=mask_c, other=0.0)
    g_csq = tl.load(g_csq_ptr + ch, mask=mask_c, other=0.0)
    channel_max = tl.load(channel_max_ptr + ch, mask=mask_c, other=0.0)
    g_max_each = tl.load(g_max_each_ptr + ch, mask=mask_c, other=0.0)
    shift_p = tl.load(pixel_shift_ptr + px, mask=mask_p, other=0.0)
    g_psum = tl.load(g_psum_ptr + px, mask=mask_p, other=0.0)
    g_psq = tl.load(g_psq_ptr + px, mask=mask_p, other=0.0)
    grad = (g_csum[:, None] + 2.0 * (x - shift_c[:, None]) * g_csq[:, None]
            + g_psum[None, :] + 2.0 * (x - shift_p[None, :]) * g_psq[None, :])
    # Like torch.amax: the max's gradient is shared evenly by the elements equal to it.
    grad += tl.where(x == channel_max[:, None], g_max_each[:, None], 0.0)
    tl.store(grad_ptr + b * gstride_b + c[:, None] * gstride_c
             + (h * gstride_h + w * gstride_w)[None, :],
             grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _accumulation_dtype(dtype: torch.dtype) -> tuple[torch.dtype, object]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _blocks(num_channels: int, num_pixels: int, num_samples: int) -> tuple[int, int]:
    """Tile sizes: pixel blocks small enough that a small map still gives many programs."""
    block_p = 128 if num_pixels * num_samples >= 128 * 512 else 32
    block_c = 32 if num_channels >= 32 else triton.next_power_of_2(num_channels)
    if os.environ.get("TRITON_INTERPRET") == "1":
        block_c = min(block_c, 16)  # the interpreter's cost grows with the tile, not the grid
    return block_c, min(block_p, triton.next_power_of_2(num_pixels))


class _TritonMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f: torch.Tensor):
        bsz, num_channels, height, width = f.shape
        num_pixels = height * width
        acc, acc_tl = _accumulation_dtype(f.dtype)
        block_c, block_p = _blocks(num_channels, num_pixels, bsz)
        num_pixel_blocks = triton.cdiv(num_pixels, block_p)
        new = dict(device=f.device, dtype=acc)
        parts = [torch.empty(bsz, num_pixel_blocks, num_channels, **new) for _ in range(3)]
        part_count = torch.empty(bsz, num_pixel_blocks, num_channels, device=f.device,
                                 dtype=torch.int32)
        channel_shift = torch.empty(bsz, num_channels, **new)
        pixel = [torch.empty(bsz, num_pixels, **new) for _ in range(3)]
        _moments_forward_kernel[(bsz, num_pixel_blocks)](
            f, *f.stride(), num_channels, num_pixels, width, num_pixel_blocks,
            channel_shift, *parts, part_count, *pixel,
            ACC_DTYPE=acc_tl, BLOCK_C=block_c, BLOCK_P=block_p)
        part_sum, part_sumsq, part_max = parts
        channel_max = part_max.amax(dim=1)
        max_count = (part_count * (part_max == channel_max.unsqueeze(1))).sum(dim=1)
        ctx.save_for_backward(f, channel_shift, channel_max, max_count, pixel[0])
        ctx.blocks = (block_c, block_p)
        ctx.mark_non_differentiable(channel_shift, pixel[0])
        return (channel_shift, part_sum.sum(dim=1), part_sumsq.sum(dim=1), channel_max,
                pixel[0], pixel[1], pixel[2])

    @staticmethod
    def backward(ctx, _g_kc, g_csum, g_csq, g_cmax, _g_kp, g_psum, g_psq):
        f, channel_shift, channel_max, max_count, pixel_shift = ctx.saved_tensors
        bsz, num_channels, height, width = f.shape
        block_c, block_p = ctx.blocks
        acc, acc_tl = _accumulation_dtype(f.dtype)
        g_max_each = g_cmax / max_count
        grads = [g.to(acc).contiguous() for g in (g_csum, g_csq, g_max_each, g_psum, g_psq)]
        grad = torch.empty_like(f)
        grid = (bsz, triton.cdiv(height * width, block_p), triton.cdiv(num_channels, block_c))
        _moments_backward_kernel[grid](
            f, *f.stride(), grad, *grad.stride(), num_channels, height * width, width,
            channel_shift, grads[0], grads[1], channel_max, grads[2],
            pixel_shift, grads[3], grads[4],
            ACC_DTYPE=acc_tl, BLOCK_C=block_c, BLOCK_P=block_p)
        return grad


def moments_triton(f: torch.Tensor) -> Moments:
    """Moments of f (B, C, H, W) by the Triton kernels, differentiable with respect to f."""
    if f.dim() != 4:
        raise ValueError(f"features must be (B, C, H, W), got shape {tuple(f.shape)}")
    if f.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"Triton moments support {SUPPORTED_DTYPES}, got {f.dtype}")
    if f.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 on CPU")
    k_c, s_c, q_c, m_c, k_p, s_p, q_p = _TritonMoments.apply(f)
    return Moments(k_c, s_c, q_c, m_c, k_p, s_p, q_p, f.shape[2], f.shape[3])

"""Bilinear resizing of feature maps and logits, with PyTorch's `align_corners=False` convention.

On CPU, the backward pass of PyTorch's bilinear upsampling is a slow scatter: for the small,
wide maps of a segmentation head (2x256x16x16 -> 64x64) forward plus backward take about
23 ms on 2 threads, as long as a bottleneck block of the backbone. Bilinear interpolation is
separable, so it is exactly two small matrix products (rows, then columns) whose forward and
backward run on BLAS: about 4 ms for the same map. segtrain uses that form while training on
CPU, and `F.interpolate` everywhere else (CUDA, inference, ONNX export, torch.compile), where
the direct kernel is as fast or faster. Both give the same values up to float rounding.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

# Above this input side the dense interpolation matrices cost more than the direct kernel saves.
_MAX_MATMUL_SIDE = 256


@lru_cache(maxsize=64)
def interpolation_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) float32 weights of 1-D linear interpolation, align_corners=False.

    Source positions are computed in float32 as PyTorch's CPU kernel does, so the weights match
    its own: src = (dst + 0.5) * in / out - 0.5, clamped at 0, blending floor(src) and the next pixel.
    """
    scale = torch.tensor(size_in / size_out, dtype=torch.float32, device="cpu")
    src = ((torch.arange(size_out, dtype=torch.float32, device="cpu") + 0.5) * scale - 0.5).clamp(min=0)
    lower = src.floor().long().clamp(max=size_in - 1)
    upper = (lower + 1).clamp(max=size_in - 1)
    upper_weight = src - lower
    rows = torch.arange(size_out, device="cpu")
    matrix = torch.zeros(size_out, size_in, dtype=torch.float32, device="cpu")
    matrix.index_put_((rows, lower), 1 - upper_weight, accumulate=True)
    matrix.index_put_((rows, upper), upper_weight, accumulate=True)
    return matrix


def _tracing() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.6
    return torch.compiler.is_compiling() or exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def _use_matmul(x: torch.Tensor) -> bool:
    return (
        not _tracing()  # graphs keep F.interpolate: one op, and sizes stay symbolic
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")  # autocast would run the products in bf16
        and x.requires_grad
        and torch.is_grad_enabled()
        and x.is_contiguous()
        and not x.is_contiguous(memory_format=torch.channels_last)  # 1x1 maps are both: keep their format
        and max(x.shape[-2:]) <= _MAX_MATMUL_SIDE
    )


def resize_to(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinearly resize an NCHW tensor to `size` (height, width); align_corners=False."""
    size = (size[0], size[1])  # no int(): under export, sizes are symbolic
    if tuple(x.shape[-2:]) == size:
        return x
    if _use_matmul(x):
        rows = interpolation_matrix(x.shape[-2], size[0])
        cols = interpolation_matrix(x.shape[-1], size[1])
        return torch.matmul(torch.matmul(rows, x), cols.t())
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

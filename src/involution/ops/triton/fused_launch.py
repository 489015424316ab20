"""Host side of the fused Triton kernels: allocation, grid, configuration and the fused passes.

``fused_forward`` and ``fused_backward`` are the native passes that the fused op
(``ops/_library.py``) calls when the backend module has them; ``launch.py`` re-exports them.
Tensors are passed with their strides and results are allocated in the input's memory format
(``layout.py``), so channels-last tensors go through without a copy. 1D and 2D problems are 3D
ones with leading spatial dimensions of size 1, given stride 0.

Configuration is a fixed rule, not autotuning: a network's first step compiles every variant it
meets, and RedNet-50 meets about ten (dtype, geometry) pairs.

* BLOCK_P = 64 pixels per program with 4 warps: one pixel per thread pair in the channel
  tiles, and the tensor-core tile (64 rows) of sm_90. BLOCK_P = 128 held twice the kernel
  columns per thread and spilled for float32 (``benchmarks/fused_sass.py``).
* BLOCK_C: 32 bytes of a pixel's group channels per channel tile, so that two threads share a
  pixel with one 16-byte vector load each (16 bfloat16/float16 or 8 float32 channels).
* BLOCK_R: the hidden features in one chunk, up to 128 (RedNet's largest R); TP: the taps
  rounded up to a power of two, at least 16 (the smallest ``tl.dot``).
* d_weight's partial sums: about ``_TARGET_PROGRAMS`` programs (chunks of tiles times groups),
  each chunk of at least ``_MIN_TILES_PER_CHUNK`` tiles so that the float32 partials stay small
  next to the tensors; the chunk count depends on the shapes only, so results are the same on
  every GPU.

float32 dots run in tf32 when ``torch.backends.cudnn.allow_tf32`` is set (PyTorch's default),
as the unfused span, a 1x1 convolution, does; otherwise in full float32.

Under ``TRITON_INTERPRET=1`` the blocks are small, so that the tests' small shapes still cover
several tiles, partial tiles, chunks of channels and of features, and multi-tile chunks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import triton

from .. import layout
from . import fused_kernels

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_BLOCK_P = 16 if _INTERPRETED else 64
_NUM_WARPS = 4
_CHANNEL_BYTES = 8 if _INTERPRETED else 32
_MAX_BLOCK_R = 16 if _INTERPRETED else 128
_TARGET_PROGRAMS = 512
_MIN_TILES_PER_CHUNK = 2 if _INTERPRETED else 8


def _to_3d(values: Sequence[int], fill: int) -> tuple[int, ...]:
    return (fill,) * (3 - len(values)) + tuple(values)


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    """(batch, channel, depth, height, width) strides of a (B, C, *spatial) tensor."""
    return (t.stride(0), t.stride(1), *_to_3d(t.stride()[2:], 0))


def _geometry(
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> dict[str, int]:
    values = {}
    for prefix, given, fill in (
        ("K", kernel_size, 1),
        ("S", stride, 1),
        ("P", padding, 0),
        ("D", dilation, 1),
    ):
        for axis, value in zip("DHW", _to_3d(given, fill), strict=True):
            values[prefix + axis] = value
    return values


def _wide(count: int, *tensors: torch.Tensor) -> bool:
    """Whether a flattened index (up to ``count``) or an element offset may reach 2**31."""
    largest = max(sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) for t in tensors)
    return count + _BLOCK_P >= 2**31 or largest >= 2**31


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def _common(
    input: torch.Tensor, features: torch.Tensor, weight: torch.Tensor, kernel_size: Sequence[int]
) -> dict[str, int]:
    """Constants shared by the kernels: channels per group, tap and feature blocks."""
    groups = weight.shape[0] // math.prod(kernel_size)
    channels_per_group = input.shape[1] // groups
    hidden = features.shape[1]
    elements = _CHANNEL_BYTES // input.element_size()
    return {
        "CG": channels_per_group,
        "TP": max(16, triton.next_power_of_2(math.prod(kernel_size))),
        "BLOCK_P": _BLOCK_P,
        "BLOCK_R": min(max(16, triton.next_power_of_2(hidden)), _MAX_BLOCK_R),
        "BLOCK_C": min(max(1, triton.next_power_of_2(channels_per_group)), max(1, elements)),
    }


def fused_forward(
    input: torch.Tensor,
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    """``involution(input, span(features))`` with each tile's kernels generated on chip.

    Args:
        input: (B, C, *in).
        features: (B, R, *out), the kernel generator's hidden features.
        weight: (G * T, R), the span's weight, T = prod(kernel_size).
        bias: (G * T,), or None.
        kernel_size, stride, padding, dilation: one int per spatial dimension.

    Returns:
        (B, C, *out), in the input's memory format.
    """
    batch, channels = input.shape[:2]
    out_size = tuple(features.shape[2:])
    out = layout.empty((batch, channels, *out_size), input, layout.channels_last(input))
    if out.numel() == 0:
        return out
    groups = weight.shape[0] // math.prod(kernel_size)
    pixels = batch * math.prod(out_size)
    common = _common(input, features, weight, kernel_size)
    tiles = triton.cdiv(pixels, _BLOCK_P)
    fused_kernels.fused_forward_kernel[(tiles * groups,)](
        input,
        features,
        weight,
        weight if bias is None else bias,
        out,
        pixels,
        groups,
        features.shape[1],
        *_to_3d(input.shape[2:], 1),
        *_to_3d(out_size, 1),
        *_strides(input),
        *_strides(features),
        *_strides(out),
        *weight.stride(),
        0 if bias is None else bias.stride(0),
        **common,
        **_geometry(kernel_size, stride, padding, dilation),
        HAS_BIAS=bias is not None,
        PRECISION=_precision(input.dtype),
        WIDE=_wide(pixels, input, features, out),
        num_warps=_NUM_WARPS,
    )
    return out


def fused_backward(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`fused_forward` for input, features, weight and bias.

    The kernel and its gradient are recomputed on chip, never stored; d_weight and d_bias are
    reduced from per-program partial sums in a fixed order, so results are deterministic.

    Returns:
        ``(grad_input, grad_features, grad_weight (G * T, R), grad_bias (G * T,))``; grad_input
        in the input's memory format, grad_features in the features'. grad_bias is computed
        even when ``bias`` is None (the op drops it).
    """
    grad_input = layout.empty(input.shape, input, layout.channels_last(input))
    grad_features = layout.empty(features.shape, features, layout.channels_last(features))
    batch, channels = input.shape[:2]
    taps = math.prod(kernel_size)
    groups = weight.shape[0] // taps
    hidden = features.shape[1]
    out_size = tuple(features.shape[2:])
    pixels = batch * math.prod(out_size)
    if pixels == 0 or channels == 0:
        grad_input.zero_()
        grad_features.zero_()
        grad = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
        return grad_input, grad_features, grad, grad.new_zeros(weight.shape[:1])

    common = _common(input, features, weight, kernel_size)
    geometry = _geometry(kernel_size, stride, padding, dilation)
    precision = _precision(input.dtype)
    wide = _wide(pixels, grad_out, input, features)
    sizes = (*_to_3d(input.shape[2:], 1), *_to_3d(out_size, 1))
    tiles = triton.cdiv(pixels, _BLOCK_P)

    fused_kernels.fused_grad_features_kernel[(tiles,)](
        grad_out,
        input,
        weight,
        grad_features,
        pixels,
        groups,
        hidden,
        *sizes,
        *_strides(grad_out),
        *_strides(input),
        *_strides(grad_features),
        *weight.stride(),
        **common,
        **geometry,
        PRECISION=precision,
        WIDE=wide,
        num_warps=_NUM_WARPS,
    )

    chunks = max(
        1, min(triton.cdiv(_TARGET_PROGRAMS, groups), triton.cdiv(tiles, _MIN_TILES_PER_CHUNK))
    )
    tiles_per_chunk = triton.cdiv(tiles, chunks)
    chunks = triton.cdiv(tiles, tiles_per_chunk)
    partial_weight = weight.new_empty((chunks, groups * taps, hidden), dtype=torch.float32)
    partial_bias = weight.new_empty((chunks, groups * taps), dtype=torch.float32)
    fused_kernels.fused_grad_weight_kernel[(chunks * groups,)](
        grad_out,
        input,
        features,
        partial_weight,
        partial_bias,
        pixels,
        tiles,
        tiles_per_chunk,
        groups,
        hidden,
        *sizes,
        *_strides(grad_out),
        *_strides(input),
        *_strides(features),
        **common,
        **geometry,
        PRECISION=precision,
        WIDE=wide,
        num_warps=_NUM_WARPS,
    )
    # A fixed-order reduction over the chunks (PyTorch's sum does not use atomics).
    grad_weight = partial_weight.sum(0).to(weight.dtype)
    grad_bias = partial_bias.sum(0).to(weight.dtype)

    strides = _to_3d(stride, 1)
    quotient = [triton.cdiv(n, s) for n, s in zip(_to_3d(input.shape[2:], 1), strides, strict=True)]
    quotient_pixels = batch * math.prod(quotient)
    fused_kernels.fused_grad_input_kernel[
        (triton.cdiv(quotient_pixels, _BLOCK_P) * groups, math.prod(strides))
    ](
        grad_out,
        features,
        weight,
        weight if bias is None else bias,
        grad_input,
        quotient_pixels,
        groups,
        hidden,
        *sizes,
        *quotient,
        *_strides(grad_out),
        *_strides(features),
        *_strides(grad_input),
        *weight.stride(),
        0 if bias is None else bias.stride(0),
        CG=common["CG"],
        BLOCK_P=_BLOCK_P,
        BLOCK_C=common["BLOCK_C"],
        **geometry,
        HAS_BIAS=bias is not None,
        WIDE=_wide(batch * math.prod(_to_3d(input.shape[2:], 1)), grad_out, features, input),
        num_warps=_NUM_WARPS,
    )
    return grad_input, grad_features, grad_weight, grad_bias

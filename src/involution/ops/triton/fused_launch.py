"""Host side of the fused Triton kernels: allocation, grid, configuration and the fused passes.

``fused_forward`` and ``fused_backward`` are the native passes that the fused op
(``ops/_library.py``) calls when the backend module has them; ``launch.py`` re-exports them.
Tensors are passed with their strides and results are allocated in the input's memory format
(``layout.py``), so channels-last tensors go through without a copy. 1D and 2D problems are 3D
ones with leading spatial dimensions of size 1, given stride 0.

Configuration is a fixed rule, not autotuning: a network's first step compiles every variant it
meets (one per dtype, geometry and layer width; RedNet-50's 32 fused kernels in bfloat16 take
about 34 s to compile for sm_90 on one core of this project's CPU), and compiling each several
times would multiply that. The rule was checked by compiling for sm_90
(``benchmarks/bench_fused_gpu.py --sass``) at RedNet-50's layers, bfloat16 and float32: no
spills but for 8 bytes (one value stored once) in two of the 64 kernels.

* BLOCK_P = 64 pixels per program: the tensor-core tile of sm_90 (64 rows). 128 held twice
  the kernel columns per thread and spilled.
* BLOCK_C = a group's channels, up to 16, per channel tile; each thread loads 16 bytes of a
  pixel's channels, so two threads share a pixel for 16-bit types and four for float32, and
  the warps are as many as that takes for 64 pixels (4 and 8). Fewer threads per pixel (two
  chunks of 8 float32 channels) kept the kernel-gradient sums alive across the chunk loop and
  spilled.
* BLOCK_R: the hidden features in one chunk, at least 16 (the smallest ``tl.dot``), up to 128
  in the forward and 64 in the backward, whose [64, BLOCK_R] float32 accumulators of d_features
  and d_weight would otherwise take 64 registers per thread; R = 128 (RedNet's last stage)
  recomputes the kernel gradient once per chunk. WP: a kernel row's taps rounded up to a power
  of two, at least 16.
* d_weight's partial sums: about ``_TARGET_PROGRAMS`` programs (chunks of tiles times groups),
  each chunk of at least ``_MIN_TILES_PER_CHUNK`` tiles so that the float32 partials stay small
  next to the tensors; the chunk count depends on the shapes only, so results are the same on
  every GPU.

Triton software-pipelines the loop over kernel rows where it can (d_features: the next row's
input is copied to shared memory while this one is summed); ``num_stages`` is left at Triton's
default.

Launches are planned once per call signature (the tensors' shapes, strides, dtypes and 16-byte
alignment, the geometry and the dot precision) and kept in ``_PLANS`` (``plan.py``): a known
call looks its plans up and, after the first launch, calls the compiled kernels directly, with
none of the argument building above nor Triton's binding and cache lookup. Before plans, the
fused op took about 0.4 ms of host time per forward and 0.7 ms per backward (profiled on an
H200's host), enough to bind small layers to the host.

float32 dots run in tf32 when ``torch.backends.cudnn.allow_tf32`` is set (PyTorch's default),
as the unfused span, a 1x1 convolution, does; otherwise in full float32.

Under ``TRITON_INTERPRET=1`` the blocks are small, so that the tests' small shapes still cover
several tiles, partial tiles, chunks of channels and of features, and multi-tile chunks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton

from .. import layout
from . import fused_kernels
from .plan import Plan, signature

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

_BLOCK_P = 32 if _INTERPRETED else 64
_MAX_BLOCK_C = 4 if _INTERPRETED else 16
_VECTOR_BYTES = 16
_MAX_BLOCK_R_FORWARD = 16 if _INTERPRETED else 128
_MAX_BLOCK_R_BACKWARD = 16 if _INTERPRETED else 64
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
    largest = max(
        sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) for t in tensors
    )
    return count + _BLOCK_P >= 2**31 or largest >= 2**31


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32:
        return "ieee"
    return "tf32"


def _common(
    input: torch.Tensor,
    features: torch.Tensor,
    weight: torch.Tensor,
    kernel_size: Sequence[int],
    max_block_r: int,
) -> dict[str, Any]:
    """Constants and warps shared by the kernels (see the module docstring)."""
    groups = weight.shape[0] // math.prod(kernel_size)
    channels_per_group = input.shape[1] // groups
    hidden = features.shape[1]
    block_c = min(triton.next_power_of_2(channels_per_group), _MAX_BLOCK_C)
    lanes_per_pixel = max(1, block_c * input.element_size() // _VECTOR_BYTES)
    return {
        "CG": channels_per_group,
        "R": hidden,
        "WP": max(16, triton.next_power_of_2(kernel_size[-1])),
        "BLOCK_P": _BLOCK_P,
        "BLOCK_R": min(max(16, triton.next_power_of_2(hidden)), max_block_r),
        "BLOCK_C": block_c,
        "num_warps": max(1, min(8, _BLOCK_P * lanes_per_pixel // 32)),
    }


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](*args, **kwargs)``, kept apart so that a static
    profile (``benchmarks/bench_fused_gpu.py --sass``) compiles exactly what would run."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


def _plan(launch: Launch) -> Plan:
    """``launch`` as a plan, without its tensors: every kernel takes them first, then integers,
    then compile-time constants."""
    tensors = next(i for i, a in enumerate(launch.args) if not isinstance(a, torch.Tensor))
    constexprs = {k: v for k, v in launch.kwargs.items() if k != "num_warps"}
    scalars = launch.args[tensors:]
    return Plan(launch.kernel, launch.grid, scalars, constexprs, launch.kwargs["num_warps"])


_PLANS: dict[tuple, tuple[Plan, ...]] = {}


def _key(pass_: str, geometry: tuple, tensors: tuple[torch.Tensor | None, ...]) -> tuple:
    """What the plans of one call depend on; the dot precision follows a global flag (see
    _precision)."""
    return (
        pass_,
        *map(tuple, geometry),
        torch.backends.cudnn.allow_tf32,
        *signature(tensors),
    )


def forward_launch(
    input: torch.Tensor,
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    out: torch.Tensor,
) -> Launch:
    """The launch of the forward kernel that writes ``out``; see :func:`fused_forward`."""
    batch = input.shape[0]
    out_size = tuple(features.shape[2:])
    groups = weight.shape[0] // math.prod(kernel_size)
    pixels = batch * math.prod(out_size)
    return Launch(
        fused_kernels.fused_forward_kernel,
        (triton.cdiv(pixels, _BLOCK_P) * groups,),
        (
            input,
            features,
            weight,
            weight if bias is None else bias,
            out,
            pixels,
            groups,
            *_to_3d(input.shape[2:], 1),
            *_to_3d(out_size, 1),
            *_strides(input),
            *_strides(features),
            *_strides(out),
            *weight.stride(),
            0 if bias is None else bias.stride(0),
        ),
        {
            **_common(input, features, weight, kernel_size, _MAX_BLOCK_R_FORWARD),
            **_geometry(kernel_size, stride, padding, dilation),
            "HAS_BIAS": bias is not None,
            "PRECISION": _precision(input.dtype),
            "WIDE": _wide(pixels, input, features, out),
        },
    )


def backward_launches(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    grad_input: torch.Tensor,
    grad_features: torch.Tensor,
    partial_weight: torch.Tensor,
    partial_bias: torch.Tensor,
) -> tuple[Launch, Launch, Launch]:
    """The launches of the three backward kernels, writing ``grad_features``, the partial sums
    (shaped by :func:`weight_chunks`) and ``grad_input``; see :func:`fused_backward`."""
    batch = input.shape[0]
    taps = math.prod(kernel_size)
    groups = weight.shape[0] // taps
    out_size = tuple(features.shape[2:])
    pixels = batch * math.prod(out_size)
    tiles = triton.cdiv(pixels, _BLOCK_P)
    common = _common(input, features, weight, kernel_size, _MAX_BLOCK_R_BACKWARD)
    geometry = _geometry(kernel_size, stride, padding, dilation)
    constants = {
        **common,
        **geometry,
        "PRECISION": _precision(input.dtype),
        "WIDE": _wide(pixels, grad_out, input, features),
    }
    sizes = (*_to_3d(input.shape[2:], 1), *_to_3d(out_size, 1))
    grad_features_launch = Launch(
        fused_kernels.fused_grad_features_kernel,
        (tiles,),
        (
            grad_out,
            input,
            weight,
            grad_features,
            pixels,
            groups,
            *sizes,
            *_strides(grad_out),
            *_strides(input),
            *_strides(grad_features),
            *weight.stride(),
        ),
        constants,
    )
    chunks = partial_weight.shape[0]
    grad_weight_launch = Launch(
        fused_kernels.fused_grad_weight_kernel,
        (chunks * groups,),
        (
            grad_out,
            input,
            features,
            partial_weight,
            partial_bias,
            pixels,
            tiles,
            triton.cdiv(tiles, chunks),
            groups,
            *sizes,
            *_strides(grad_out),
            *_strides(input),
            *_strides(features),
        ),
        constants,
    )
    strides = _to_3d(stride, 1)
    in_size = _to_3d(input.shape[2:], 1)
    quotient = [triton.cdiv(n, s) for n, s in zip(in_size, strides, strict=True)]
    quotient_pixels = batch * math.prod(quotient)
    grad_input_launch = Launch(
        fused_kernels.fused_grad_input_kernel,
        (triton.cdiv(quotient_pixels, _BLOCK_P) * groups, math.prod(strides)),
        (
            grad_out,
            features,
            weight,
            weight if bias is None else bias,
            grad_input,
            quotient_pixels,
            groups,
            *sizes,
            *quotient,
            *_strides(grad_out),
            *_strides(features),
            *_strides(grad_input),
            *weight.stride(),
            0 if bias is None else bias.stride(0),
        ),
        {
            **geometry,
            "CG": common["CG"],
            "R": common["R"],
            "HAS_BIAS": bias is not None,
            "BLOCK_P": _BLOCK_P,
            "BLOCK_C": common["BLOCK_C"],
            "num_warps": common["num_warps"],
            "WIDE": _wide(batch * math.prod(in_size), grad_out, features, input),
        },
    )
    return grad_features_launch, grad_weight_launch, grad_input_launch


def weight_chunks(pixels: int, groups: int) -> int:
    """How many chunks of tiles d_weight's partial sums take: see the module docstring."""
    tiles = triton.cdiv(pixels, _BLOCK_P)
    chunks = max(
        1, min(triton.cdiv(_TARGET_PROGRAMS, groups), triton.cdiv(tiles, _MIN_TILES_PER_CHUNK))
    )
    # Equal chunks: the last one must not be empty.
    return triton.cdiv(tiles, triton.cdiv(tiles, chunks))


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
    shape = (batch, channels, *features.shape[2:])
    out = layout.empty(shape, input)
    if out.numel() == 0:
        return out
    geometry = (kernel_size, stride, padding, dilation)
    key = _key("forward", geometry, (input, features, weight, bias, out))
    plans = _PLANS.get(key)
    if plans is None:
        launch = forward_launch(input, features, weight, bias, *geometry, out)
        plans = _PLANS[key] = (_plan(launch),)
    plans[0].launch(input, features, weight, weight if bias is None else bias, out)
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
    grad_input = layout.empty(input.shape, input)
    grad_features = layout.empty(features.shape, features)
    rows, hidden = weight.shape
    groups = rows // math.prod(kernel_size)
    pixels = input.shape[0] * math.prod(features.shape[2:])
    if pixels == 0 or input.shape[1] == 0:
        grad_input.zero_()
        grad_features.zero_()
        grad = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
        return grad_input, grad_features, grad, grad.new_zeros(rows)
    chunks = weight_chunks(pixels, groups)
    partial_weight = weight.new_empty((chunks, rows, hidden), dtype=torch.float32)
    partial_bias = weight.new_empty((chunks, rows), dtype=torch.float32)
    geometry = (kernel_size, stride, padding, dilation)
    key = _key(
        "backward", geometry, (grad_out, input, features, weight, bias, grad_input, grad_features)
    )
    plans = _PLANS.get(key)
    if plans is None:
        launches = backward_launches(
            grad_out,
            input,
            features,
            weight,
            bias,
            *geometry,
            grad_input,
            grad_features,
            partial_weight,
            partial_bias,
        )
        plans = _PLANS[key] = tuple(map(_plan, launches))
    # The tensors of each launch, in the order of backward_launches.
    grad_features_plan, grad_weight_plan, grad_input_plan = plans
    grad_features_plan.launch(grad_out, input, weight, grad_features)
    grad_weight_plan.launch(grad_out, input, features, partial_weight, partial_bias)
    grad_input_plan.launch(grad_out, features, weight, weight if bias is None else bias, grad_input)
    # A fixed-order reduction over the chunks (PyTorch's sum uses no atomics).
    grad_weight = partial_weight.sum(0).to(weight.dtype)
    grad_bias = partial_bias.sum(0).to(weight.dtype)
    return grad_input, grad_features, grad_weight, grad_bias

"""Host side of the Triton backend: allocation, grid, autotuning and the backend interface.

``forward``, ``grad_input`` and ``grad_kernel`` have the signatures of ``ops/portable.py``. The
kernels (``kernels.py``) are three-dimensional; a 1D or 2D problem is reshaped exactly into a 3D
one whose leading spatial dimensions have size 1, kernel size 1, stride 1, padding 0 and
dilation 1, which only adds views, never copies.

Inputs arrive contiguous in NCHW order: the op (``ops/_library.py``) calls ``.contiguous()``,
so a channels_last input costs one extra read and write of the tensor before the kernel runs.

Block sizes are autotuned per shape (``triton.autotune`` keyed on the channel count per group
and the spatial sizes) over a few configurations; under ``TRITON_INTERPRET=1`` a single small
configuration is used, so that the interpreter runs each kernel once and exercises the loops
over channel chunks and pixel blocks even on small test shapes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton

from . import kernels

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Channels per chunk: the group's channels of one pixel block stay in registers. RedNet uses 16
# channels per group, so one chunk covers a group and each kernel value is read once.
_MAX_BLOCK_C = 4 if _INTERPRETED else 16

if _INTERPRETED:
    _CONFIGS = [triton.Config({"BLOCK_P": 32}, num_warps=1)]
else:
    # One pixel per thread and BLOCK_C channels in its registers, or two pixels per thread.
    _CONFIGS = [
        triton.Config({"BLOCK_P": 64}, num_warps=2),
        triton.Config({"BLOCK_P": 128}, num_warps=4),
        triton.Config({"BLOCK_P": 256}, num_warps=4),
    ]
_KEY = ["CG", "D", "H", "W", "OD", "OH", "OW"]


def _prune(configs: list, named_args: dict, **kwargs: Any) -> list:
    """Drops blocks larger than the image, so that small layers compile a single config."""
    pixels = named_args["OD"] * named_args["OH"] * named_args["OW"]
    limit = max(triton.next_power_of_2(pixels), configs[0].kwargs["BLOCK_P"])
    return [c for c in configs if c.kwargs["BLOCK_P"] <= limit]


def _autotuned(kernel: Callable) -> Any:
    return triton.autotune(
        configs=_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune}
    )(kernel)


_forward = _autotuned(kernels.involution_forward_kernel)
_grad_input = _autotuned(kernels.involution_grad_input_kernel)
_grad_kernel = _autotuned(kernels.involution_grad_kernel_kernel)


def _to_3d(values: Sequence[int], fill: int) -> tuple[int, ...]:
    return (fill,) * (3 - len(values)) + tuple(values)


def _launch(
    kernel: Any,
    first: torch.Tensor,
    second: torch.Tensor,
    out: torch.Tensor,
    channels_per_group: int,
    input_size: Sequence[int],
    out_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    rows: int,
    pixels: int,
) -> torch.Tensor:
    """Runs ``kernel`` over ``rows`` (batch, group) rows of ``pixels`` pixels each."""
    if out.numel() == 0:
        return out
    ks, st = _to_3d(kernel_size, 1), _to_3d(stride, 1)
    pad, dil = _to_3d(padding, 0), _to_3d(dilation, 1)

    def grid(meta: dict) -> tuple[int]:
        return (rows * triton.cdiv(pixels, meta["BLOCK_P"]),)

    kernel[grid](
        first,
        second,
        out,
        channels_per_group,
        *_to_3d(input_size, 1),
        *_to_3d(out_size, 1),
        KD=ks[0],
        KH=ks[1],
        KW=ks[2],
        SD=st[0],
        SH=st[1],
        SW=st[2],
        PD=pad[0],
        PH=pad[1],
        PW=pad[2],
        DD=dil[0],
        DH=dil[1],
        DW=dil[2],
        BLOCK_C=min(triton.next_power_of_2(channels_per_group), _MAX_BLOCK_C),
    )
    return out


def forward(
    input: torch.Tensor,
    kernel: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    batch, channels = input.shape[:2]
    groups = kernel.shape[1]
    out_size = tuple(kernel.shape[3:])
    out = input.new_empty((batch, channels, *out_size))
    return _launch(
        _forward,
        input,
        kernel,
        out,
        channels // groups,
        input.shape[2:],
        out_size,
        kernel_size,
        stride,
        padding,
        dilation,
        rows=batch * groups,
        pixels=math.prod(out_size),
    )


def grad_input(
    grad_out: torch.Tensor,
    kernel: torch.Tensor,
    input_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    batch, channels = grad_out.shape[:2]
    groups = kernel.shape[1]
    grad = grad_out.new_empty((batch, channels, *input_size))
    return _launch(
        _grad_input,
        grad_out,
        kernel,
        grad,
        channels // groups,
        input_size,
        grad_out.shape[2:],
        kernel_size,
        stride,
        padding,
        dilation,
        # One program row per (batch, group) and residue class of the input pixels modulo stride.
        rows=batch * groups * math.prod(stride),
        pixels=math.prod(-(-n // s) for n, s in zip(input_size, stride, strict=True)),
    )


def grad_kernel(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    batch, channels = input.shape[:2]
    out_size = tuple(grad_out.shape[2:])
    grad = input.new_empty((batch, groups, math.prod(kernel_size), *out_size))
    return _launch(
        _grad_kernel,
        grad_out,
        input,
        grad,
        channels // groups,
        input.shape[2:],
        out_size,
        kernel_size,
        stride,
        padding,
        dilation,
        rows=batch * groups,
        pixels=math.prod(out_size),
    )

"""Host side of the Triton backend: allocation, grid, autotuning and the backend interface.

``forward``, ``grad_input`` and ``grad_kernel`` have the signatures of ``ops/portable.py``. The
kernels (``kernels.py``) are three-dimensional; a 1D or 2D problem is reshaped exactly into a 3D
one whose leading spatial dimensions have size 1, kernel size 1, stride 1, padding 0 and
dilation 1, which only adds views, never copies.

The kernels read contiguous NCHW tensors: an input in another layout (channels_last) is copied
once on the way in, and the op (``ops/_library.py``) returns results in the input's layout.

The strip length ROWS (see ``kernels.py``) is autotuned per shape (``triton.autotune`` keyed on
the number of (batch, group) rows, the channel count per group and the spatial sizes) over three
configurations; under ``TRITON_INTERPRET=1`` a single small configuration is used, so that the
interpreter runs each kernel once and exercises the loops over channel chunks, strips and
programs spanning several rows even on small test shapes.
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

# Strip lengths the autotuner tries on a GPU (the tests run each under the interpreter). Longer
# strips load fewer input rows per output but hold more registers: ptxas for sm_90 at K = 7 with
# 16 channels per group gives 96-150 registers at ROWS = 1 and up to 215 at ROWS = 3, without
# spills; ROWS = 4 spilled at stride 2 and at K = 9, so it is left out.
STRIP_ROWS = (1, 2, 3)

if _INTERPRETED:
    # Three rows per strip, so that strips overhang the image edge on the small test shapes.
    _CONFIGS = [triton.Config({"BLOCK_P": 32, "ROWS": 3}, num_warps=1)]
else:
    # One lane per strip column, 128 lanes per program; ROWS = 1 is the plain
    # one-pixel-per-lane kernel.
    _CONFIGS = [triton.Config({"BLOCK_P": 128, "ROWS": rows}, num_warps=4) for rows in STRIP_ROWS]
_KEY = ["NR", "CG", "D", "H", "W", "OD", "OH", "OW"]


def _autotuned(kernel: Callable) -> Any:
    return triton.autotune(configs=_CONFIGS, key=_KEY)(kernel)


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
    grid_size: Sequence[int],
    residues: int = 1,
) -> torch.Tensor:
    """Runs ``kernel`` over ``rows`` (batch, group) rows, each a ``grid_size`` grid of lanes
    (output pixels, or input pixels on the quotient grid) cut into strips of ROWS rows, once
    per residue of the input modulo the stride (``grad_input``; 1 for the others)."""
    if out.numel() == 0:
        return out
    ks, st = _to_3d(kernel_size, 1), _to_3d(stride, 1)
    pad, dil = _to_3d(padding, 0), _to_3d(dilation, 1)

    depth, height, width = _to_3d(grid_size, 1)

    def grid(meta: dict) -> tuple[int, int]:
        lanes = rows * depth * triton.cdiv(height, meta["ROWS"]) * width
        return (triton.cdiv(lanes, meta["BLOCK_P"]), residues)

    kernel[grid](
        first,
        second,
        out,
        rows,
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
    input, kernel = input.contiguous(), kernel.contiguous()
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
        grid_size=out_size,
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
    grad_out, kernel = grad_out.contiguous(), kernel.contiguous()
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
        # Lanes walk the input on the quotient grid; programs along axis 1 take one residue each.
        rows=batch * groups,
        grid_size=[-(-n // s) for n, s in zip(input_size, stride, strict=True)],
        residues=math.prod(stride),
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
    grad_out, input = grad_out.contiguous(), input.contiguous()
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
        grid_size=out_size,
    )


from .fused_launch import fused_backward, fused_forward  # noqa: E402, F401

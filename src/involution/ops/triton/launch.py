"""Host side of the Triton backend: allocation, launch configuration and the backend interface.

``forward``, ``grad_input`` and ``grad_kernel`` have the signatures of ``ops/portable.py``. The
kernels (``kernels.py``) are three-dimensional; a 1D or 2D problem is run as a 3D one whose
leading spatial dimensions have size 1, kernel size 1, stride 1, padding 0 and dilation 1.

Layouts. Tensors are passed where they lie, with their strides: no copy on the way in or out.
Results are allocated in the layout the op returns (``ops/layout.py``): the output and the input
gradient in the memory format of the input (of grad_out, for the input gradient), the kernel
gradient pixel-major for a channels_last input. When the channel tensors of a call all have unit
channel stride, the kernels vectorize along channels (``CL``): a thread loads up to 16 bytes of
a group's channels at once, as far as the channel rows' alignment allows. Otherwise they take the strided path, which is how NCHW runs, with no
copy either: the same kernels with the channel stride a runtime value, one thread per lane
holding the lane's channels and loading them one element at a time, consecutive lanes on
consecutive pixels of a row so that a warp's loads stay coalesced. Its cost is in load
instructions, not bytes: one per channel where channels_last issues one per 16 bytes of channels
(4 in float32, 8 in bfloat16; SASS counts in ``benchmarks/kernel_sass.py``). Its time against
channels_last is what ``benchmarks/bench_gpu.py --steps nchw`` measures.

Configuration. There is no autotuning: ``choose_config`` picks the compile-time parameters from
the layout, the dtype and the image height by a fixed rule, so that a network compiles one
variant per (kernel, geometry, layout, dtype, strip length) and nothing is benchmarked on first
use. Everything a launch needs (grid, sizes, strides, compile-time parameters, and after the
first launch the compiled kernel) is computed from Python integers, once per call signature
(the three tensors' shapes, strides and pointer alignment, the dtype, device and geometry), and
kept in ``_PLANS`` as a ``plan.Plan``; a known call only looks up its plan and launches. The
outputs are allocated by the host wrappers below (``layout.py``, from PyTorch's caching
allocator); planning and launching allocate nothing and never wait for the device, so the op
can be captured in a CUDA graph once each call signature has run eagerly (the first run
compiles).
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
from . import kernels
from .plan import Plan, signature

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Channels per chunk: a group's channels of one lane stay in registers. RedNet uses 16
# channels per group, so one chunk covers a group and each kernel value is read once. The
# interpreter takes 4, so that the tests' small groups run the loop over chunks.
MAX_BLOCK_C = 4 if _INTERPRETED else 16
# Bytes a thread loads or stores at once along the channels of a channels_last tile, and the
# largest row alignment (in elements) worth telling the compiler.
_VECTOR_BYTES = 16
_MAX_ALIGN = 16
_NUM_WARPS = 4
# Offsets inside one batch element, and lane counts, are 32-bit in the kernels.
_INT32_LIMIT = 2**31


@dataclass(frozen=True)
class Config:
    """Compile-time parameters of one launch (see ``kernels.py``).

    Attributes:
        block_p: lanes per program.
        block_c: channels per chunk.
        rows: strip length ROWS (1 = one pixel per lane, no register reuse).
        num_warps: warps per program.
    """

    block_p: int
    block_c: int
    rows: int
    num_warps: int = _NUM_WARPS


def choose_config(
    channels_last: bool, alignment: int, group_channels: int, height: int, element_size: int
) -> Config:
    """The launch configuration of a call, by rule.

    Args:
        channels_last: the channel tensors have unit channel stride (vector path).
        alignment: a power of two, in elements, dividing every channel row's offset.
        group_channels: channels per group.
        height: rows of the grid the lanes walk (output rows; input rows on the quotient
            grid for the input gradient).
        element_size: bytes per element.

    A thread holds one lane's channels, or on the vector path the ``block_c / v`` threads of
    a lane hold ``v`` channels each, ``v`` being one 16-byte vector: ``block_p`` is the number
    of lanes that gives every thread of the program exactly one lane.
    """
    block_c = max(1, min(triton.next_power_of_2(group_channels), MAX_BLOCK_C))
    threads = 32 * _NUM_WARPS
    if _INTERPRETED:
        block_p = 64  # several programs and partly filled ones, even on the tests' shapes
    elif channels_last:
        per_thread = min(block_c, alignment, _VECTOR_BYTES // element_size)
        block_p = threads * per_thread // block_c
    else:
        block_p = threads
    return Config(block_p=block_p, block_c=block_c, rows=strip_rows(height))


# Strip lengths the rule picks from. Longer strips load fewer input rows per output pixel (7x7
# kernel: ROWS + 6 rows per ROWS pixels) and run fewer instructions per multiply-add; ROWS = 2
# runs about a third fewer instructions per multiply-add than ROWS = 1, without spilling
# (benchmarks/kernel_sass.py, sm_90), and one length for every image of 4 rows or more keeps a
# network to one compiled variant per geometry.
STRIP_ROWS = (1, 2)


def strip_rows(height: int) -> int:
    """Two rows per strip; one for grids shorter than 4 rows (1D problems have 1), where the
    strips would overhang the image by a large fraction."""
    return 2 if height >= 4 else 1


def _to_3d(values: Sequence[int], fill: int) -> tuple[int, ...]:
    return (fill,) * (3 - len(values)) + tuple(values)


def _strides(t: torch.Tensor, leading: int) -> tuple[int, ...]:
    """Strides of ``t`` with 3 spatial dimensions after ``leading`` others: missing and size-1
    dimensions get stride 0, which reads the same elements and keeps alignment facts simple."""
    strides = [0 if n == 1 else s for n, s in zip(t.shape, t.stride(), strict=True)]
    spatial = strides[leading:]
    return (*strides[:leading], *(0,) * (3 - len(spatial)), *spatial)


def _extent(t: torch.Tensor) -> int:
    """Largest offset of an element of one batch entry of ``t``, plus one."""
    return 1 + sum((n - 1) * s for n, s in zip(t.shape[1:], t.stride()[1:], strict=True))


_PLANS: dict[tuple, Plan] = {}


def _plan(
    kernel: Any,
    first: torch.Tensor,
    second: torch.Tensor,
    out: torch.Tensor,
    taps: torch.Tensor,
    channel_tensors: tuple[torch.Tensor, torch.Tensor],
    groups: int,
    input_size: Sequence[int],
    out_size: Sequence[int],
    geometry: tuple[Sequence[int], ...],
    lane_grid: Sequence[int],
    residues: int,
) -> Plan:
    kernel_size, stride, padding, dilation = geometry
    batch, channels = channel_tensors[0].shape[:2]
    group_channels = channels // groups
    extent = max(_extent(t) for t in (first, second, out))
    if extent >= _INT32_LIMIT:
        raise RuntimeError(
            f"triton: one batch entry spans {extent} elements; the kernels index a batch entry "
            "with 32-bit offsets (expected < 2**31)"
        )
    strides = [_strides(t, 3 if t is taps else 2) for t in (first, second, out)]
    channels_last = all(t.stride(1) == 1 for t in channel_tensors)
    alignment = 1
    if channels_last:
        # Every term of a channel row's offset is a multiple of these (stride 0: any).
        row_strides = [s for t in channel_tensors for i, s in enumerate(_strides(t, 2)) if i != 1]
        common = math.gcd(group_channels, *row_strides, _MAX_ALIGN)
        alignment = common & -common  # its largest power-of-two divisor
    config = choose_config(
        channels_last, alignment, group_channels, lane_grid[1], channel_tensors[0].element_size()
    )
    align = math.gcd(alignment, config.block_c)
    # Channel tensors' row strides go in units of ``align`` elements (see kernels._channels).
    strides = [
        st if t is taps else tuple(v if i == 1 else v // align for i, v in enumerate(st))
        for t, st in zip((first, second, out), strides, strict=True)
    ]
    lanes = lane_grid[0] * math.ceil(lane_grid[1] / config.rows) * lane_grid[2] * groups
    blocks = triton.cdiv(lanes, config.block_p)
    if lanes + config.block_p >= _INT32_LIMIT or batch * blocks >= _INT32_LIMIT:
        raise RuntimeError(
            f"triton: {lanes} lanes per batch entry and {batch * blocks} programs (expected "
            "< 2**31 each)"
        )
    ks, st = _to_3d(kernel_size, 1), _to_3d(stride, 1)
    pad, dil = _to_3d(padding, 0), _to_3d(dilation, 1)
    constexprs: dict[str, int | bool] = {
        "CG": group_channels,
        **dict(zip(("KD", "KH", "KW"), ks, strict=True)),
        **dict(zip(("SD", "SH", "SW"), st, strict=True)),
        **dict(zip(("PD", "PH", "PW"), pad, strict=True)),
        **dict(zip(("DD", "DH", "DW"), dil, strict=True)),
        "CL": channels_last,
        "ALIGN": align,
        "TAPS_INNER": taps.stride(2) == 1 or taps.shape[2] == 1,
        "BLOCK_C": config.block_c,
        "BLOCK_P": config.block_p,
        "ROWS": config.rows,
    }
    scalars = (
        groups,
        *_to_3d(input_size, 1),
        *_to_3d(out_size, 1),
        blocks,
        *strides[0],
        *strides[1],
        *strides[2],
    )
    return Plan(kernel, (batch * blocks, residues, 1), scalars, constexprs, config.num_warps)


def _launch(
    kernel: Any,
    first: torch.Tensor,
    second: torch.Tensor,
    out: torch.Tensor,
    taps: torch.Tensor,
    channel_tensors: tuple[torch.Tensor, torch.Tensor],
    groups: int,
    input_size: Sequence[int],
    out_size: Sequence[int],
    geometry: tuple[Sequence[int], ...],
    lane_grid: Sequence[int],
    residues: int = 1,
) -> torch.Tensor:
    """Runs ``kernel`` on (first, second) -> out; ``taps`` is the kernel-shaped one of the
    three and ``channel_tensors`` the two others; lanes walk ``lane_grid`` (depth, height,
    width) per (batch, group), once per residue of the input modulo the stride."""
    if out.numel() == 0:
        return out
    # Everything the plan depends on. ``out``'s shape carries what the two others do not (the
    # input size of the input gradient, the groups of the kernel gradient); Triton specializes
    # pointers on 16-byte alignment, so a compiled kernel serves only tensors aligned as those
    # it was compiled for.
    key = (kernel, geometry, *signature((first, second, out)))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _plan(
            kernel,
            first,
            second,
            out,
            taps,
            channel_tensors,
            groups,
            input_size,
            out_size,
            geometry,
            lane_grid,
            residues,
        )
    plan.launch(first, second, out)
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
    out_size = tuple(kernel.shape[3:])
    out = layout.empty((batch, channels, *out_size), input)
    geometry = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
    return _launch(
        kernels.involution_forward_kernel,
        input,
        kernel,
        out,
        taps=kernel,
        channel_tensors=(input, out),
        groups=kernel.shape[1],
        input_size=input.shape[2:],
        out_size=out_size,
        geometry=geometry,
        lane_grid=_to_3d(out_size, 1),
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
    grad = layout.empty((batch, channels, *input_size), grad_out)
    geometry = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
    return _launch(
        kernels.involution_grad_input_kernel,
        grad_out,
        kernel,
        grad,
        taps=kernel,
        channel_tensors=(grad_out, grad),
        groups=kernel.shape[1],
        input_size=input_size,
        out_size=grad_out.shape[2:],
        geometry=geometry,
        # Lanes walk the input on the quotient grid; programs along axis 1 take one residue each.
        lane_grid=_to_3d([-(-n // s) for n, s in zip(input_size, stride, strict=True)], 1),
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
    batch = input.shape[0]
    out_size = tuple(grad_out.shape[2:])
    grad = layout.empty_kernel(
        (batch, groups, math.prod(kernel_size), *out_size), input, layout.channels_last(input)
    )
    geometry = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))
    return _launch(
        kernels.involution_grad_kernel_kernel,
        grad_out,
        input,
        grad,
        taps=grad,
        channel_tensors=(input, grad_out),
        groups=groups,
        input_size=input.shape[2:],
        out_size=out_size,
        geometry=geometry,
        lane_grid=_to_3d(out_size, 1),
    )


from .fused_launch import fused_backward, fused_forward  # noqa: E402, F401

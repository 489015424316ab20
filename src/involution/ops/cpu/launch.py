"""Host side of the CPU backend: allocation, strides, the thread split and the backend interface.

``forward``, ``grad_input`` and ``grad_kernel`` have the signatures of ``ops/portable.py``. The
kernels (``kernels.cpp``) are three-dimensional; a 1D or 2D problem is passed as a 3D one whose
leading spatial dimensions have size 1 (kernel size 1, stride 1, padding 0, dilation 1).

Results are allocated in the layout the op returns (``ops/layout.py``), and the kernels write
them where they lie. The operand each kernel reads at every tap (the input, or grad_out in
grad_input) needs its channels contiguous: a channels-last tensor is read in place, any other
is copied to channels-last first (the cost of NCHW; see BENCHMARKS.md). Kernels and the other
operands are read with their own strides, whatever they are.

Threads: the rows of the result (one (batch, depth, height) line each) are cut into
``torch.get_num_threads()`` contiguous ranges, one per thread of a small pool; ctypes releases
the GIL for the duration of each call. Each result element is computed by one thread in a
fixed order, so the results do not depend on the number of threads.
"""

from __future__ import annotations

import array
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import layout
from .build import library

# Storage dtypes the kernels take (codes of kernels.cpp); bfloat16 accumulates in float32.
DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}

# Multiply-adds below which a call stays on one thread: handing work to the pool costs tens
# of microseconds.
_MIN_MACS_PER_THREAD = 1 << 18

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="involution")
    return _pool


def _forget_pool() -> None:
    """A forked child has none of the parent's threads: it starts a pool of its own."""
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _problem(
    a: torch.Tensor,
    a_leading: int,
    b: torch.Tensor,
    b_leading: int,
    out: torch.Tensor,
    out_leading: int,
    channels: int,
    groups: int,
    in_size: Sequence[int],
    out_size: Sequence[int],
    geometry: tuple[Sequence[int], Sequence[int], Sequence[int], Sequence[int]],
) -> array.array:
    """The ``Problem`` struct of ``kernels.cpp`` (42 int64 fields), 1D/2D padded to 3D.

    ``*_leading`` is the number of non-spatial dimensions of each tensor: 2 for (B, C, *spatial)
    features, 3 for (B, G, T, *spatial) kernels; each gets 6 stride slots.
    """
    pad = 3 - len(in_size)
    ones, zeros = [1] * pad, [0] * pad

    def strides(t: torch.Tensor, leading: int) -> list[int]:
        s = t.stride()
        return [*s[:leading], *zeros, *s[leading:], *([0] * (3 - leading))]

    kernel_size, stride, padding, dilation = geometry
    return array.array(
        "q",
        [
            a.data_ptr(),
            b.data_ptr(),
            out.data_ptr(),
            *strides(a, a_leading),
            *strides(b, b_leading),
            *strides(out, out_leading),
            a.shape[0],
            channels,
            groups,
            *ones,
            *in_size,
            *ones,
            *out_size,
            *ones,
            *kernel_size,
            *ones,
            *stride,
            *zeros,
            *padding,
            *ones,
            *dilation,
        ],
    )


def _run(entry: str, problem: array.array, dtype: torch.dtype, rows: int, macs: int) -> None:
    """Calls kernel ``entry`` on ``rows`` result rows, split among threads."""
    fn = getattr(library(), entry)
    code = DTYPES[dtype]
    address = problem.buffer_info()[0]
    threads = max(1, min(torch.get_num_threads(), rows, macs // _MIN_MACS_PER_THREAD))
    bounds = [rows * i // threads for i in range(threads + 1)]
    futures = [
        _executor().submit(fn, address, code, bounds[i], bounds[i + 1]) for i in range(1, threads)
    ]
    codes = [fn(address, code, bounds[0], bounds[1])] + [f.result() for f in futures]
    if any(c != 0 for c in codes):
        raise MemoryError(f"involution CPU kernel {entry} could not allocate its scratch memory")


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
    if out.numel():
        geometry = (kernel_size, stride, padding, dilation)
        problem = _problem(
            input,
            2,
            kernel,
            3,
            out,
            2,
            channels,
            kernel.shape[1],
            input.shape[2:],
            out_size,
            geometry,
        )
        rows = batch * math.prod(out_size[:-1])
        _run("involution_forward", problem, out.dtype, rows, out.numel() * kernel.shape[2])
    return out


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
    if grad.numel():
        geometry = (kernel_size, stride, padding, dilation)
        problem = _problem(
            grad_out,
            2,
            kernel,
            3,
            grad,
            2,
            channels,
            kernel.shape[1],
            input_size,
            grad_out.shape[2:],
            geometry,
        )
        rows = batch * math.prod(input_size[:-1])
        _run("involution_grad_input", problem, grad.dtype, rows, grad_out.numel() * kernel.shape[2])
    return grad


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
    shape = (batch, groups, math.prod(kernel_size), *out_size)
    grad = layout.empty_kernel(shape, input, layout.channels_last(input))
    if grad.numel():
        geometry = (kernel_size, stride, padding, dilation)
        problem = _problem(
            input, 2, grad_out, 2, grad, 3, channels, groups, input.shape[2:], out_size, geometry
        )
        rows = batch * math.prod(out_size[:-1])
        _run("involution_grad_kernel", problem, grad.dtype, rows, grad_out.numel() * shape[2])
    return grad

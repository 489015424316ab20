"""Host side of the CPU backend: allocation, strides, the thread split and the backend interface.

``forward``, ``grad_input`` and ``grad_kernel`` have the signatures of ``ops/portable.py``;
``fused_forward`` and ``fused_backward`` are the fused op's native passes (``ops/_library.py``),
which generate each row's kernel from the features inside the kernels instead of reading a stored
kernel map. The kernels (``kernels.cpp``) are three-dimensional; a 1D or 2D problem is passed as
a 3D one whose leading spatial dimensions have size 1 (kernel size 1, stride 1, padding 0,
dilation 1).

Results are allocated in the layout the op returns (``ops/layout.py``), and the kernels write
them where they lie; the largest on memory of their own (``results.py``). Every operand is
read with its own strides: the operand read at every tap (the input, or grad_out in grad_input)
is copied row by row into a per-thread buffer with its channels innermost, contiguous runs for a
channels-last tensor and a transpose for an NCHW one (the cost of NCHW; see BENCHMARKS.md).

Threads: the rows of the result (one (batch, depth, height) line each) are cut into
``torch.get_num_threads()`` contiguous ranges, one per thread of an OpenMP team inside the
kernels, on torch's own pool of threads where the library shares torch's runtime (``build.py``;
a second pool would wait for cores that torch's threads spin on between operations). ctypes
releases the GIL for the duration of each call. Each result element is computed by one thread
in a fixed order, so the results do not depend on the number of threads; the fused backward's
weight and bias gradients are summed per chunk of rows that depend on the shapes alone, then
the chunks in order.
"""

from __future__ import annotations

import array
import math
from collections.abc import Sequence

import torch

from .. import layout
from ..dispatch import CPU_DTYPES
from . import results
from .build import library, symbol

# Multiply-adds below which a call stays on one thread: waking the pool costs microseconds.
_MIN_MACS_PER_THREAD = 1 << 18


def _empty(shape: Sequence[int], like: torch.Tensor, kernel: bool = False) -> torch.Tensor:
    """An uninitialized result in the layout the op returns for ``like`` (``ops/layout.py``):
    (B, C, *spatial), or with ``kernel`` a (B, G, T, *out) kernel gradient. The large ones get
    memory of their own (``results.py``)."""
    if math.prod(shape) * like.element_size() >= results.LARGE_BYTES:
        # The layout alone, then the memory.
        like = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device="meta")
    if kernel:
        t = layout.empty_kernel(shape, like, layout.channels_last(like))
    else:
        t = layout.empty(shape, like)
    return results.empty(t.shape, t.stride(), t.dtype) if t.is_meta else t


def _strides(t: torch.Tensor | None, leading: int) -> list[int]:
    """6 stride slots of a tensor with ``leading`` non-spatial dimensions, padded to 3D (zeros)."""
    if t is None:
        return [0] * 6
    s = t.stride()
    pad = [0] * (leading + 3 - t.dim())
    return [*s[:leading], *pad, *s[leading:], *([0] * (3 - leading))]


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _problem(
    a: torch.Tensor,
    a_leading: int,
    b: torch.Tensor | None,
    b_leading: int,
    out: torch.Tensor | None,
    out_leading: int,
    channels: int,
    groups: int,
    in_size: Sequence[int],
    out_size: Sequence[int],
    geometry: tuple[Sequence[int], Sequence[int], Sequence[int], Sequence[int]],
) -> array.array:
    """The ``Problem`` struct of ``kernels.cpp`` (42 int64 fields), 1D/2D padded to 3D.

    ``*_leading`` is the number of non-spatial dimensions of each tensor: 2 for (B, C, *spatial)
    features, 3 for (B, G, T, *spatial) kernels; each gets 6 stride slots. ``b`` and ``out`` are
    None where a fused pass has no such tensor.
    """
    pad = 3 - len(in_size)
    ones, zeros = [1] * pad, [0] * pad
    kernel_size, stride, padding, dilation = geometry
    return array.array(
        "q",
        [
            a.data_ptr(),
            _address(b),
            _address(out),
            *_strides(a, a_leading),
            *_strides(b, b_leading),
            *_strides(out, out_leading),
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


def _run(
    entry: str,
    problem: array.array,
    dtype: torch.dtype,
    rows: int,
    macs: int,
    fused: array.array | None = None,
    unit: int = 1,
) -> None:
    """Calls kernel ``entry`` for ``dtype`` on ``rows`` result rows, split among threads in whole
    ``unit``s."""
    type_name = CPU_DTYPES[dtype]
    fn = getattr(library(type_name), symbol(entry, type_name))
    units = -(-rows // unit)
    threads = max(1, min(torch.get_num_threads(), units, macs // _MIN_MACS_PER_THREAD))
    address = problem.buffer_info()[0]
    fused_address = 0 if fused is None else fused.buffer_info()[0]
    code = fn(address, fused_address, rows, unit, threads)
    if code != 0:
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
    out = _empty((batch, channels, *out_size), input)
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
    grad = _empty((batch, channels, *input_size), grad_out)
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
    grad = _empty(shape, input, kernel=True)
    if grad.numel():
        geometry = (kernel_size, stride, padding, dilation)
        problem = _problem(
            input, 2, grad_out, 2, grad, 3, channels, groups, input.shape[2:], out_size, geometry
        )
        rows = batch * math.prod(out_size[:-1])
        _run("involution_grad_kernel", problem, grad.dtype, rows, grad_out.numel() * shape[2])
    return grad


# ---------------------------------------------------------------------------------------------
# The fused op (``ops/_library.py``): the kernel is generated per output row from the features
# inside the kernels and never stored (see kernels.cpp).

# Partial sums of grad_weight and grad_bias: at most this many chunks of rows, and at most about
# this many values in all. The chunks depend on the shapes alone, so the sums do not depend on
# the thread count; a thread gets whole chunks.
_MAX_CHUNKS = 64
_MAX_PARTIAL_VALUES = 1 << 22


def _fused(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    grad_features: torch.Tensor | None = None,
    partials: torch.Tensor | None = None,
    chunk_rows: int = 1,
) -> array.array:
    """The ``Fused`` struct of ``kernels.cpp`` (21 int64 fields)."""
    return array.array(
        "q",
        [
            features.data_ptr(),
            weight.data_ptr(),
            _address(bias),
            _address(grad_features),
            _address(partials),
            *_strides(features, 2),
            *_strides(grad_features, 2),
            *weight.stride(),
            features.shape[1],
            chunk_rows,
        ],
    )


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
    """Involution of ``input`` with kernels generated from ``features`` by the span.

    Args:
        input: (B, C, *spatial).
        features: (B, R, *out), the hidden features at each output pixel.
        weight: (G * T, R), the span's weight; T = K^n taps.
        bias: (G * T,), or None.
        kernel_size, stride, padding, dilation: n ints each.

    Returns:
        (B, C, *out) in the input's memory format.
    """
    batch, channels = input.shape[:2]
    out_size = tuple(features.shape[2:])
    out = _empty((batch, channels, *out_size), input)
    if out.numel():
        taps = math.prod(kernel_size)
        groups = weight.shape[0] // taps
        geometry = (kernel_size, stride, padding, dilation)
        problem = _problem(
            input, 2, None, 3, out, 2, channels, groups, input.shape[2:], out_size, geometry
        )
        rows = batch * math.prod(out_size[:-1])
        macs = out.numel() * taps + features.numel() * weight.shape[0]
        _run(
            "involution_fused_forward",
            problem,
            out.dtype,
            rows,
            macs,
            _fused(features, weight, bias),
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

    Two passes, neither of which stores the kernel or its gradient: grad_input regenerates the
    kernel rows it reads; grad_features forms the kernel's gradient row by row and takes it back
    through the span, summing grad_weight and grad_bias per chunk of rows.

    Returns:
        ``(grad_input, grad_features, grad_weight (G * T, R), grad_bias (G * T,))``; grad_input
        in the input's memory format, grad_features in the features'. grad_bias is computed even
        when ``bias`` is None (the op drops it).
    """
    batch, channels = input.shape[:2]
    out_size = tuple(grad_out.shape[2:])
    taps = math.prod(kernel_size)
    groups, hidden = weight.shape[0] // taps, weight.shape[1]
    geometry = (kernel_size, stride, padding, dilation)
    grad_input = _empty(input.shape, input)
    grad_features = _empty(features.shape, features)
    if not grad_out.numel():
        grad_input.zero_()
        grad_features.zero_()
        grad_weight = torch.zeros_like(weight)
        return grad_input, grad_features, grad_weight, grad_weight.new_zeros(weight.shape[0])
    values = weight.shape[0] * (hidden + 1)
    out_rows = batch * math.prod(out_size[:-1])
    chunks = max(1, min(out_rows, _MAX_CHUNKS, _MAX_PARTIAL_VALUES // values))
    chunk_rows = -(-out_rows // chunks)
    accumulate = torch.float64 if input.dtype == torch.float64 else torch.float32
    partials = torch.zeros((-(-out_rows // chunk_rows), values), dtype=accumulate)
    fused = _fused(features, weight, bias, grad_features, partials, chunk_rows)
    macs = grad_out.numel() * taps + features.numel() * weight.shape[0]

    problem = _problem(
        grad_out, 2, None, 3, grad_input, 2, channels, groups, input.shape[2:], out_size, geometry
    )
    in_rows = batch * math.prod(input.shape[2:-1])
    _run("involution_fused_grad_input", problem, input.dtype, in_rows, macs, fused)
    problem = _problem(
        input, 2, grad_out, 2, None, 2, channels, groups, input.shape[2:], out_size, geometry
    )
    _run(
        "involution_fused_grad_features",
        problem,
        input.dtype,
        out_rows,
        2 * macs,
        fused,
        chunk_rows,
    )
    # Chunks added in order: the same sums whatever the thread count.
    split = weight.shape[0] * hidden
    # The kernels sum grad_weight transposed, (R, G * T).
    grad_weight = partials[:, :split].sum(0).view(hidden, weight.shape[0]).t().contiguous()
    grad_weight = grad_weight.to(weight.dtype)
    return grad_input, grad_features, grad_weight, partials[:, split:].sum(0).to(weight.dtype)

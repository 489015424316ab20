"""Involution as a few standard operations, the form that exported graphs carry.

Exported models must run without this library: an ONNX file in any ONNX runtime (no custom
domain), a saved ``ExportedProgram`` after ``torch.export.load`` alone. So, while a model is
exported, :mod:`involution.functional` does not leave the registered custom op in the graph as
it is; what it does instead depends on :func:`traced_form`:

* ``"aten"`` (``torch.export``, or an ONNX exporter that this module does not drive): the
  involution is computed by :func:`forward`, in standard ATen operations, and traced with them;
* ``"onnx"`` (inside :func:`onnx_translation`, which ``involution.export.export_onnx`` uses):
  the registered ops stay in the traced program as single nodes, traced through their fake
  implementations, and the ONNX exporter translates each with the table this module supplies.
  Tracing an opaque op skips the symbolic shape arithmetic of a dozen tensor operations per
  layer on dynamic sizes, which was most of the time an export took.

Both forms compute the same few operations (Li et al., CVPR 2021, Eq. 4):

1. the input is zero-padded and laid out per group as (B, G, N, C/G), N the padded pixels;
2. one Gather with an index of (output pixel, tap) pairs picks each output pixel's K^n
   neighbourhood: ``patches[b, g, o, t, :] = padded[b, g, o * stride + offset_t * dilation, :]``;
3. one batched MatMul weighs the taps: ``out[b, g, o, :] = kernel[b, g, :, o] @ patches[b, g, o]``,
   a (1 x K^n) by (K^n x C/G) product per pixel and group;
4. the result goes back to (B, C, *out).

Why this layout, measured with onnxruntime on the CPU against a one-hot grouped convolution and
channels-first or channels-last element gathers followed by a Mul and a ReduceSum (BENCHMARKS.md
has the figures): the K^n-fold ``patches`` tensor is the whole cost. Channels last, the Gather
copies runs of C/G contiguous values rather than single ones, and the MatMul reads ``patches``
once, where a broadcast Mul and a ReduceSum would write and read it twice more. A grouped
convolution with one-hot weights extracts the same neighbourhoods with K^n times the
multiply-adds.

The index depends only on the spatial sizes, so it is computed from the input's shape: batch,
height and width stay dynamic. In ONNX it is built from the grid of the padded input's flat
positions (``Range`` reshaped to its shape): every stride-th position, where each output
pixel's first tap lies, plus the offsets of the K^n taps, read from the grid at the origin.
That takes 8 nodes, and the output shape 1 or 2, built for the first layer of each geometry and
input size and reused by the later ones (the exporter gives equal sizes the same symbolic name).
A layer is then 9 ONNX nodes beyond its kernel generator (Pad, 3 Reshape, 3 Transpose, Gather,
MatMul).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .reference import pad_input

__all__ = ["forward", "onnx_translation", "traced_form"]

# Inside onnx_translation(): the builder of this export's ONNX nodes.
_BUILDER: contextvars.ContextVar[_OnnxBuilder | None] = contextvars.ContextVar(
    "involution_onnx_builder", default=None
)


def traced_form() -> str | None:
    """How an involution is traced now.

    Returns:
        None when no exporter is tracing; ``"onnx"`` inside :func:`onnx_translation` (the
        registered ops stay as single nodes); ``"aten"`` while any other export traces
        (``torch.export``, ``torch.onnx.export`` called directly): :func:`forward`.
    """
    # Also None under torch.compile, before the ContextVar below, which it cannot trace before
    # torch 2.13.
    if not (_exporting() or torch.onnx.is_in_onnx_export()):
        return None
    return "aten" if _BUILDER.get() is None else "onnx"


def _exporting() -> bool:
    """Whether torch.export traces now.

    Before torch 2.13, torch.compile traces ``torch.compiler.is_exporting()`` as True under any
    compilation, so the flag it returns is read directly where it exists.
    """
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


@contextlib.contextmanager
def onnx_translation() -> Iterator[dict[Callable[..., Any], Callable[..., Any]]]:
    """Keeps the registered ops in what is traced inside, and gives their ONNX translation.

    Yields:
        The ``custom_translation_table`` to pass to one ``torch.onnx.export(..., dynamo=True)``
        called inside the block.

    Raises:
        ImportError: onnxscript is missing.
    """
    token = _BUILDER.set(_OnnxBuilder())
    try:
        yield {
            torch.ops.involution.involution.default: _onnx_involution,
            torch.ops.involution.fused_involution.default: _onnx_fused_involution,
        }
    finally:
        _BUILDER.reset(token)


def _neighbourhood_index(
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    out_size: Sequence[int],
    padded_size: Sequence[int],
    device: torch.device,
) -> torch.Tensor:
    """Flat index into the padded pixels of each output pixel's taps, (prod(out_size) * K^n,).

    Ordered as ``(*out_size, tap)``, taps row-major as in the kernel's K^n axis.
    """
    n = len(out_size)
    taps = list(itertools.product(*(range(k) for k in kernel_size)))
    index: torch.Tensor | None = None
    for dim in range(n):
        offsets = torch.tensor([t[dim] * dilation[dim] for t in taps], device=device)
        positions = torch.arange(out_size[dim], device=device)
        if stride[dim] != 1:
            positions = positions * stride[dim]
        # (out_size[dim], 1, ..., 1, taps): broadcasts against the later dimensions.
        term = positions.reshape(-1, *([1] * (n - dim))) + offsets
        index = term if index is None else index * padded_size[dim] + term
    assert index is not None
    return index.reshape(-1)


def forward(
    input: torch.Tensor,
    kernel: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    """Involution of ``input`` (B, C, *spatial) with ``kernel`` (B, G, K^n, *out).

    Same arguments and result as the registered op (see :func:`involution.functional
    .involution2d`); the geometry arguments are tuples of n ints. Computes in the input's dtype.
    """
    batch, channels = input.shape[:2]
    groups, num_taps = kernel.shape[1], kernel.shape[2]
    out_size = kernel.shape[3:]
    n = len(out_size)
    group_channels = channels // groups
    padded = pad_input(input, padding) if any(padding) else input
    index = _neighbourhood_index(
        kernel_size, stride, dilation, out_size, padded.shape[2:], input.device
    )
    # (B, G, N, C/G): the Gather below copies runs of C/G values.
    x = padded.reshape(batch, groups, group_channels, -1).transpose(2, 3)
    patches = x.index_select(2, index).reshape(batch, groups, *out_size, num_taps, group_channels)
    # (B, G, *out, 1, K^n): one row of tap weights per pixel.
    weights = kernel.reshape(batch, groups, num_taps, 1, *out_size)
    weights = weights.permute(0, 1, *range(4, 4 + n), 3, 2)
    out = torch.matmul(weights, patches)  # (B, G, *out, 1, C/G)
    out = out.permute(0, 1, n + 3, *range(2, 2 + n), n + 2)
    return out.reshape(batch, channels, *out_size)


def _same_size(
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> bool:
    """Whether the output has the input's spatial size (stride 1, "same" padding)."""
    geometry = zip(kernel_size, stride, padding, dilation, strict=True)
    return all(s == 1 and 2 * p == d * (k - 1) for k, s, p, d in geometry)


class _OnnxBuilder:
    """Builds the ONNX nodes of the involutions of one export (the steps of the module
    docstring), sharing the index and output shapes between layers of equal sizes."""

    def __init__(self) -> None:
        import numpy
        import onnx_ir
        from onnxscript import opset18

        # Any: the values are the exporter's symbolic tensors, whatever onnxscript's typing says.
        self.op: Any = opset18
        self._numpy, self._ir = numpy, onnx_ir
        # A key naming a value by what it depends on -> the value, built for an earlier layer.
        self._shared: dict[tuple[Any, ...], Any] = {}

    def _ints(self, values: Any) -> Any:
        """An int64 constant of the (nested) list ``values``."""
        array = self._numpy.array(values, dtype=self._numpy.int64)
        return self.op.Constant(value=self._ir.tensor(array))

    @staticmethod
    def _key(what: str, value: Any, start: int, *more: Any) -> tuple[Any, ...] | None:
        """A key for ``what`` built from the sizes of ``value`` from dimension ``start`` on
        (ints, or the exporter's symbolic names: equal names are equal sizes) and ``more``;
        None, for no sharing, where a size is unknown or ``value`` is in no graph yet."""
        if value.shape is None or value.graph is None:
            return None
        sizes: list[int | str] = []
        for dim in value.shape[start:]:
            name = dim if isinstance(dim, int) else dim.value
            if name is None:
                return None
            sizes.append(name)
        return (what, value.graph, tuple(sizes), *more)

    def _shared_value(self, key: tuple[Any, ...] | None, build: Callable[[], Any]) -> Any:
        """The value remembered under ``key``, or ``build()`` (remembered if there is a key)."""
        if key is None:
            return build()
        if key not in self._shared:
            self._shared[key] = build()
        return self._shared[key]

    def _index(self, padded: Any, kernel_size, stride, dilation) -> Any:
        """(prod(out), K^n) flat positions in the padded pixels of each output pixel's taps."""
        op, n = self.op, len(kernel_size)
        size = op.Shape(padded, start=2)
        positions = op.Range(
            op.Constant(value_int=0), op.ReduceProd(size, keepdims=0), op.Constant(value_int=1)
        )
        grid = op.Reshape(positions, size)  # grid[*p] = flat position of padded pixel p
        spans = [d * (k - 1) for k, d in zip(kernel_size, dilation, strict=True)]
        zeros, axes = self._ints([0] * n), self._ints(range(n))
        # Output pixel o reads its first tap at o * stride: every stride-th position that
        # leaves room for the dilated kernel (an end of -span, or all for span 0).
        ends = [-s if s else torch.iinfo(torch.int64).max for s in spans]
        first = op.Slice(grid, zeros, self._ints(ends), axes, self._ints(stride))
        # Tap t reads offset_t * dilation further: positions of the window at the origin,
        # (1, K^n).
        window = [
            [t * d for t, d in zip(tap, dilation, strict=True)]
            for tap in itertools.product(*(range(k) for k in kernel_size))
        ]
        offsets = op.GatherND(grid, self._ints([window]))
        return op.Add(op.Reshape(first, self._ints([-1, 1])), offsets)

    def aggregate(
        self, input: Any, kernel: Any, groups: int, geometry: tuple, sized: Any, start: int
    ) -> Any:
        """Involution of ``input`` with ``kernel``, (B, G * K^n, *out) or (B, G, K^n, *out).

        The output's spatial sizes are those of ``sized`` from dimension ``start`` on.
        """
        op = self.op
        kernel_size, stride, padding, dilation = geometry
        channels, taps = input.shape[1], math.prod(kernel_size)
        padded = input
        if any(padding):
            padded = op.Pad(input, self._ints([0, 0, *padding, 0, 0, *padding]))
        # (B, G, N, C/G): the Gather copies runs of C/G values.
        x = op.Reshape(padded, self._ints([0, groups, channels // groups, -1]))
        x = op.Transpose(x, perm=[0, 1, 3, 2])
        index = self._shared_value(
            self._key("index", input, 2, geometry),
            lambda: self._index(padded, kernel_size, stride, dilation),
        )
        patches = op.Gather(x, index, axis=2)  # (B, G, L, K^n, C/G), L output pixels
        # (B, G, L, 1, K^n): one row of tap weights per pixel.
        weights = op.Reshape(kernel, self._ints([0, groups, 1, taps, -1]))
        weights = op.Transpose(weights, perm=[0, 1, 4, 2, 3])
        out = op.Transpose(op.MatMul(weights, patches), perm=[0, 1, 4, 3, 2])  # (B, G, C/G, 1, L)
        # (B, C, *out): the input's shape where the layer keeps the size.
        if _same_size(*geometry):
            key = self._key("shape", input, 2, channels)
            shape = self._shared_value(key, lambda: op.Shape(input))
        else:
            shape = self._shared_value(
                self._key("shape", sized, start, channels),
                lambda: op.Concat(self._ints([0, channels]), op.Shape(sized, start=start), axis=0),
            )
        return op.Reshape(out, shape)

    def kernel_from_features(self, features: Any, weight: Any, bias: Any, n: int) -> Any:
        """The 1x1 convolution of ``span.py``: (B, R, *out) features to (B, G * K^n, *out)."""
        # A constant once the optimizer folds it: the weight is an initializer.
        filters = self.op.Reshape(weight, self._ints([weight.shape[0], -1, *([1] * n)]))
        return (
            self.op.Conv(features, filters, bias)
            if bias is not None
            else self.op.Conv(features, filters)
        )


def _builder() -> _OnnxBuilder:
    builder = _BUILDER.get()
    assert builder is not None, "the table of onnx_translation() is used inside it only"
    return builder


# The exporter calls these with onnx_ir values for the tensors and Python values for the other
# arguments, and records the builder's op calls as nodes of its graph.


def _onnx_involution(input, kernel, kernel_size, stride, padding, dilation, backend):
    """``involution::involution``: ``kernel`` is (B, G, K^n, *out)."""
    geometry = tuple(map(tuple, (kernel_size, stride, padding, dilation)))
    return _builder().aggregate(input, kernel, kernel.shape[1], geometry, kernel, 3)


def _onnx_fused_involution(
    input, features, weight, bias, kernel_size, stride, padding, dilation, backend
):
    """``involution::fused_involution``: the kernel is generated from ``features``."""
    builder = _builder()
    kernel = builder.kernel_from_features(features, weight, bias, len(kernel_size))
    geometry = tuple(map(tuple, (kernel_size, stride, padding, dilation)))
    groups = weight.shape[0] // math.prod(kernel_size)
    return builder.aggregate(input, kernel, groups, geometry, features, 2)

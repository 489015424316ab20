"""Involution as a few standard tensor operations, the form that exported graphs carry.

While a model is exported (``torch.export``, and through it ONNX), :mod:`involution.functional`
computes involution here instead of calling the registered op, so that an ONNX file runs in any
runtime and a saved ``ExportedProgram`` loads without this library. Per layer the ONNX graph
holds a dozen nodes beyond the generator's convolutions, whatever the kernel size:

1. the input is zero-padded and laid out per group as (B, G, N, C/G), N the padded pixels;
2. one Gather with a precomputed index picks each output pixel's K^n neighbourhood:
   ``patches[b, g, *o, t, :] = padded[b, g, o * stride + offset_t * dilation, :]``;
3. one batched MatMul weighs the taps: ``out[b, g, *o, :] = kernel[b, g, :, *o] @ patches``,
   a (1 x K^n) by (K^n x C/G) product per pixel and group (Li et al., CVPR 2021, Eq. 4);
4. the result goes back to (B, C, *out).

Why this layout, measured with onnxruntime on the CPU against a one-hot grouped convolution and
channels-first or channels-last element gathers followed by a Mul and a ReduceSum (BENCHMARKS.md
has the figures): the K^n-fold ``patches`` tensor is the whole cost. Channels last, the Gather
copies runs of C/G contiguous values rather than single ones, and the MatMul reads ``patches``
once, where a broadcast Mul and a ReduceSum would write and read it twice more. A grouped
convolution with one-hot weights extracts the same neighbourhoods with K^n times the
multiply-adds.

The index depends only on the spatial sizes, so the exporter computes it from the input's
shape: batch, height and width stay dynamic, and layers of the same geometry share it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from .reference import pad_input

__all__ = ["forward"]


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

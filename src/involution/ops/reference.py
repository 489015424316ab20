"""Reference involution: explicit K^n expansion of the input, then a weighted sum.

This is the oracle every other backend is tested against (Li et al., CVPR 2021, Eq. 4). It is
obviously correct and memory-hungry (the expansion holds K^n copies of the input), so dispatch
never picks it automatically. Gradients come from PyTorch autograd.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import layout


def pad_input(input: torch.Tensor, padding: Sequence[int]) -> torch.Tensor:
    """Zero-pads every spatial dimension of ``input`` by ``padding`` on both sides."""
    pad: list[int] = []
    for p in reversed(padding):
        pad += [p, p]
    return F.pad(input, pad)


def tap_index(
    offsets: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    out_size: Sequence[int],
) -> tuple[Any, ...]:
    """Index of the padded input's pixels that kernel tap ``offsets`` multiplies (all channels)."""
    return (
        ...,
        *(
            slice(o * d, o * d + (n - 1) * s + 1, s)
            for o, s, d, n in zip(offsets, stride, dilation, out_size, strict=True)
        ),
    )


def taps(kernel_size: Sequence[int]) -> list[tuple[int, ...]]:
    """Kernel tap offsets in the order of the kernel's K^n axis (row-major)."""
    return list(itertools.product(*(range(k) for k in kernel_size)))


class _GradInLayout(torch.autograd.Function):
    """Identity whose backward hands the gradient back in the layout of its argument (as
    ``torch.empty_like`` would allocate it), as the other backends' gradients come."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        ctx.stride = torch.empty_like(t, device="meta").stride()
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        if grad.stride() == ctx.stride:
            return grad
        out = torch.empty_strided(grad.shape, ctx.stride, dtype=grad.dtype, device=grad.device)
        return out.copy_(grad)


def involution(
    input: torch.Tensor,
    kernel: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    batch, channels = input.shape[:2]
    groups, num_taps = kernel.shape[1], kernel.shape[2]
    out_size = kernel.shape[3:]
    input, kernel = _GradInLayout.apply(input), _GradInLayout.apply(kernel)
    padded = pad_input(input, padding)
    columns = torch.stack(
        [padded[tap_index(o, stride, dilation, out_size)] for o in taps(kernel_size)],
        dim=2,
    )  # (B, C, K^n, *out): the K^n expansion
    columns = columns.reshape(batch, groups, channels // groups, num_taps, *out_size)
    out = (columns * kernel.unsqueeze(2)).sum(dim=3)
    return layout.like_input(out.reshape(batch, channels, *out_size), input)

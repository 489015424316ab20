"""Memory layouts of the op's tensors: which one an input has, and allocating the others to match.

The op follows ``nn.Conv2d``: outputs come back in the memory format of the input. A
channels_last input ``(B, C, H, W)`` (strides ordered B, H, W, C) gives a channels_last output
and input gradient, and its kernel gradient ``(B, G, K^2, Ho, Wo)`` is *pixel-major* (memory
order B, Ho, Wo, G, K^2): the layout of a channels_last span convolution's ``(B, G*K^2, Ho, Wo)``
output viewed as ``(B, G, K^2, Ho, Wo)``, so the gradient flows back into that convolution
without a copy. 3D inputs use channels_last_3d likewise. Anything else (1D inputs, contiguous
or arbitrarily strided ones) gives contiguous results.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Rank of the input -> the channels-last memory format torch has for it.
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` (B, C, *spatial) is laid out channels-last, as ``nn.Conv2d`` would see it.

    A tensor whose layout is both contiguous and channels-last (one channel, or one pixel)
    counts as contiguous.
    """
    fmt = _CHANNELS_LAST.get(t.dim())
    return fmt is not None and t.is_contiguous(memory_format=fmt) and not t.is_contiguous()


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format the op's results take for input ``t``."""
    return _CHANNELS_LAST[t.dim()] if channels_last(t) else torch.contiguous_format


def empty(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """An uninitialized (B, C, *spatial) tensor with ``like``'s dtype, device and memory format
    (channels-last exactly when ``like`` is)."""
    fmt = _CHANNELS_LAST[len(shape)] if channels_last(like) else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def empty_kernel(shape: Sequence[int], like: torch.Tensor, pixel_major: bool) -> torch.Tensor:
    """An uninitialized (B, G, T, *out) kernel-shaped tensor with ``like``'s dtype and device,
    pixel-major or contiguous."""
    if not pixel_major:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return torch.empty_strided(
        shape, _pixel_major_strides(shape), dtype=like.dtype, device=like.device
    )


def _pixel_major_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Strides of a (B, G, T, *out) tensor stored in the order B, *out, G, T."""
    strides = [0] * len(shape)
    step = 1
    for i in (2, 1, *range(len(shape) - 1, 2, -1), 0):  # innermost first
        strides[i] = step
        step *= max(shape[i], 1)
    return tuple(strides)


def like_input(t: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """``t`` (B, C, *spatial) in ``input``'s memory format; ``t`` itself when it already is."""
    return t.contiguous(memory_format=memory_format(input))


def like_kernel_of(t: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """Kernel-shaped ``t`` pixel-major when ``input`` is channels-last; ``t`` when it already is."""
    if not channels_last(input):
        return t.contiguous()
    # Compared without allocating: this runs on every kernel gradient, CUDA graph captures too.
    if t.stride() == _pixel_major_strides(t.shape):
        return t
    return empty_kernel(t.shape, t, pixel_major=True).copy_(t)

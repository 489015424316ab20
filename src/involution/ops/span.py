"""The span step of kernel generation, and its backward (Li et al., CVPR 2021, Eq. 6).

An involution layer generates the kernel of each output pixel from R hidden features at that
pixel: ``kernel = span(features)``, a 1x1 convolution R -> G * K^n with bias. This file holds that
map and its adjoints in plain PyTorch operations, for the fused op's composed passes
(``_library.py``): they recompute the kernel instead of storing it. With channels-last features
the kernel comes out pixel-major (see ``layout.py``) and every product below is one matrix
multiply over the pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def span(
    features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, taps: int
) -> torch.Tensor:
    """Per-pixel kernels from hidden features.

    Args:
        features: (B, R, *out).
        weight: (G * taps, R).
        bias: (G * taps,), or None.
        taps: K^n, the kernel taps per group.

    Returns:
        (B, G, taps, *out), a view of the 1x1 convolution's (B, G * taps, *out) output.
    """
    n = features.dim() - 2
    out = _CONV[n](features, weight.view(*weight.shape, *(1,) * n), bias)
    return out.view(out.shape[0], out.shape[1] // taps, taps, *out.shape[2:])


def span_backward(
    grad_kernel: torch.Tensor,
    features: torch.Tensor,
    weight: torch.Tensor,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`span` for features, weight and bias, each where ``needs`` asks.

    Args:
        grad_kernel: (B, G, taps, *out), the gradient of the kernel.
        features, weight: as given to :func:`span`.
        needs: which of (features, weight, bias) want a gradient.

    Returns:
        ``(grad_features (B, R, *out), grad_weight (G * taps, R), grad_bias (G * taps,))``, with
        None where not needed. Differentiable: higher-order gradients go through it.
    """
    n = features.dim() - 2
    grad = grad_kernel.flatten(1, 2)  # (B, G * taps, *out)
    grad_features = grad_weight = grad_bias = None
    if needs[0]:
        transposed = weight.t().reshape(weight.shape[1], weight.shape[0], *(1,) * n)
        grad_features = _CONV[n](grad, transposed)
    if needs[1]:
        # Sum over batches of (G * taps, P) @ (P, R); a fixed-order reduction.
        pixels = torch.bmm(grad.flatten(2), features.flatten(2).transpose(1, 2))
        grad_weight = pixels.sum(0)
    if needs[2]:
        grad_bias = grad.sum((0, *range(2, n + 2)))
    return grad_features, grad_weight, grad_bias

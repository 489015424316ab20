"""The involution op, declared once with torch.library for every dimension and backend.

Three custom ops, each with a fake (meta) implementation and a registered autograd formula:

* ``involution::involution(input, kernel, ...)`` computes the output;
* ``involution::grad_input(grad_out, kernel, ...)`` and ``involution::grad_kernel(grad_out,
  input, ...)`` are its two partial backward passes.

The op is bilinear in (input, kernel), so the backward of each gradient op is again made of these
three ops: gradients of any order work, and ``torch.compile(fullgraph=True)`` sees opaque nodes
with known shapes instead of a graph break. The ``backend`` argument names the implementation
(see ``dispatch.py``) that runs on the tensors' device.

Backends take their tensors in any layout and may return any layout; these wrappers hand results
back in the input's memory format (``layout.py``), which is a no-op for a backend that already
allocated them so. The fake implementations allocate the same layouts, so compiled graphs see the
strides the eager op produces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from . import layout, span
from .dispatch import implementation


@torch.library.custom_op("involution::involution", mutates_args=())
def involution(
    input: torch.Tensor,
    kernel: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str,
) -> torch.Tensor:
    out = implementation(backend).forward(input, kernel, kernel_size, stride, padding, dilation)
    return layout.like_input(out, input)


@involution.register_fake
def _(input, kernel, kernel_size, stride, padding, dilation, backend):
    shape = (input.shape[0], input.shape[1], *kernel.shape[3:])
    return layout.empty(shape, input)


@torch.library.custom_op("involution::grad_input", mutates_args=())
def grad_input(
    grad_out: torch.Tensor,
    kernel: torch.Tensor,
    input_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str,
) -> torch.Tensor:
    grad = implementation(backend).grad_input(
        grad_out, kernel, input_size, kernel_size, stride, padding, dilation
    )
    return layout.like_input(grad, grad_out)


@grad_input.register_fake
def _(grad_out, kernel, input_size, kernel_size, stride, padding, dilation, backend):
    shape = (grad_out.shape[0], grad_out.shape[1], *input_size)
    return layout.empty(shape, grad_out)


@torch.library.custom_op("involution::grad_kernel", mutates_args=())
def grad_kernel(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    backend: str,
) -> torch.Tensor:
    grad = implementation(backend).grad_kernel(
        grad_out, input, kernel_size, stride, padding, dilation, groups
    )
    return layout.like_kernel_of(grad, input)


@grad_kernel.register_fake
def _(grad_out, input, kernel_size, stride, padding, dilation, groups, backend):
    num_taps = 1
    for k in kernel_size:
        num_taps *= k
    shape = (input.shape[0], groups, num_taps, *grad_out.shape[2:])
    return layout.empty_kernel(shape, input, layout.channels_last(input))


def _geometry(ctx: Any) -> tuple[Sequence[int], Sequence[int], Sequence[int], Sequence[int]]:
    return ctx.kernel_size, ctx.stride, ctx.padding, ctx.dilation


def _save_geometry(ctx: Any, kernel_size, stride, padding, dilation, backend) -> None:
    ctx.kernel_size, ctx.stride, ctx.padding, ctx.dilation = kernel_size, stride, padding, dilation
    ctx.backend = backend


# d/d(input, kernel) of <grad, involution(input, kernel)>.
def _involution_setup(ctx, inputs, output):
    input, kernel, kernel_size, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(input, kernel)
    _save_geometry(ctx, kernel_size, stride, padding, dilation, backend)


def _involution_backward(ctx, grad):
    input, kernel = ctx.saved_tensors
    geometry = _geometry(ctx)
    gi = gk = None
    if ctx.needs_input_grad[0]:
        # grad_input follows grad_out's memory format; the input's gradient takes the input's.
        gi = layout.like_input(
            grad_input(grad, kernel, input.shape[2:], *geometry, ctx.backend), input
        )
    if ctx.needs_input_grad[1]:
        gk = grad_kernel(grad, input, *geometry, kernel.shape[1], ctx.backend)
    return gi, gk, None, None, None, None, None


involution.register_autograd(_involution_backward, setup_context=_involution_setup)


# grad_input is linear in grad_out and in kernel: its adjoints are the forward op (for grad_out)
# and grad_kernel (for kernel).
def _grad_input_setup(ctx, inputs, output):
    grad_out, kernel, _input_size, kernel_size, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(grad_out, kernel)
    _save_geometry(ctx, kernel_size, stride, padding, dilation, backend)


def _grad_input_backward(ctx, grad):
    grad_out, kernel = ctx.saved_tensors
    geometry = _geometry(ctx)
    gg = gk = None
    if ctx.needs_input_grad[0]:
        gg = involution(grad, kernel, *geometry, ctx.backend)
    if ctx.needs_input_grad[1]:
        gk = grad_kernel(grad_out, grad, *geometry, kernel.shape[1], ctx.backend)
    return gg, gk, None, None, None, None, None, None


grad_input.register_autograd(_grad_input_backward, setup_context=_grad_input_setup)


# grad_kernel is linear in grad_out and in input: its adjoints are the forward op (for grad_out)
# and grad_input (for input).
def _grad_kernel_setup(ctx, inputs, output):
    grad_out, input, kernel_size, stride, padding, dilation, _groups, backend = inputs
    ctx.save_for_backward(grad_out, input)
    _save_geometry(ctx, kernel_size, stride, padding, dilation, backend)


def _grad_kernel_backward(ctx, grad):
    grad_out, input = ctx.saved_tensors
    geometry = _geometry(ctx)
    gg = gi = None
    if ctx.needs_input_grad[0]:
        gg = involution(input, grad, *geometry, ctx.backend)
    if ctx.needs_input_grad[1]:
        gi = grad_input(grad_out, grad, input.shape[2:], *geometry, ctx.backend)
    return gg, gi, None, None, None, None, None, None


grad_kernel.register_autograd(_grad_kernel_backward, setup_context=_grad_kernel_setup)


# The fused op: involution(input, span(features, weight, bias)) with the kernel generated from the
# hidden features inside the op and never saved for the backward. A backend module may provide
# native passes ``fused_forward(input, features, weight, bias, kernel_size, stride, padding,
# dilation)`` and ``fused_backward(grad_out, input, features, weight, bias, kernel_size, stride,
# padding, dilation) -> (grad_input, grad_features, grad_weight, grad_bias)``; otherwise the op
# composes the span (``span.py``) with the backend's three passes, and its backward recomputes the
# kernel. The composed backward is made of differentiable operations, so gradients of any order
# work; a native backward gives first-order gradients.


@torch.library.custom_op("involution::fused_involution", mutates_args=())
def fused_involution(
    input: torch.Tensor,
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str,
) -> torch.Tensor:
    backend_module = implementation(backend)
    geometry = (kernel_size, stride, padding, dilation)
    if hasattr(backend_module, "fused_forward"):
        out = backend_module.fused_forward(input, features, weight, bias, *geometry)
    else:
        kernel = span.span(features, weight, bias, math.prod(kernel_size))
        out = backend_module.forward(input, kernel, *geometry)
    return layout.like_input(out, input)


@fused_involution.register_fake
def _(input, features, weight, bias, kernel_size, stride, padding, dilation, backend):
    shape = (input.shape[0], input.shape[1], *features.shape[2:])
    return layout.empty(shape, input)


@torch.library.custom_op("involution::fused_involution_backward", mutates_args=())
def fused_involution_backward(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gi, gf, gw, gb = implementation(backend).fused_backward(
        grad_out, input, features, weight, bias, kernel_size, stride, padding, dilation
    )
    return layout.like_input(gi, input), layout.like_input(gf, features), gw, gb


@fused_involution_backward.register_fake
def _(grad_out, input, features, weight, bias, kernel_size, stride, padding, dilation, backend):
    return (
        layout.empty(input.shape, input),
        layout.empty(features.shape, features),
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape[:1]),
    )


def _fused_setup(ctx, inputs, output):
    input, features, weight, bias, kernel_size, stride, padding, dilation, backend = inputs
    ctx.save_for_backward(input, features, weight, bias)
    _save_geometry(ctx, kernel_size, stride, padding, dilation, backend)


def _fused_backward(ctx, grad):
    input, features, weight, bias = ctx.saved_tensors
    geometry = _geometry(ctx)
    needs = ctx.needs_input_grad[:4]
    if hasattr(implementation(ctx.backend), "fused_backward"):
        grads = fused_involution_backward(
            grad, input, features, weight, bias, *geometry, ctx.backend
        )
        return *(g if need else None for g, need in zip(grads, needs, strict=True)), *[None] * 5
    gi = gf = gw = gb = None
    if needs[0]:
        kernel = span.span(features, weight, bias, math.prod(ctx.kernel_size))
        gi = layout.like_input(
            grad_input(grad, kernel, input.shape[2:], *geometry, ctx.backend), input
        )
    if any(needs[1:]):
        groups = weight.shape[0] // math.prod(ctx.kernel_size)
        gk = grad_kernel(grad, input, *geometry, groups, ctx.backend)
        gf, gw, gb = span.span_backward(gk, features, weight, (needs[1], needs[2], needs[3]))
        if gf is not None:
            gf = layout.like_input(gf, features)
    return gi, gf, gw, gb, None, None, None, None, None


fused_involution.register_autograd(_fused_backward, setup_context=_fused_setup)

"""FLOP counting built on ``torch.utils.flop_counter``, with the involution op's formulas.

Importing this module registers, for ``torch.ops.involution.{involution, grad_input,
grad_kernel}``, the cost of the aggregation (Li et al., CVPR 2021, Sec. 3.2): each of the
``B * C * prod(out)`` outputs sums ``K^n`` products, so ``B * C * prod(out) * K^n``
multiply-adds, and as many for each of the two backward ops. ``FlopCounterMode`` counts two
FLOPs per multiply-add, so the formulas return twice that. The fused op
(``fused_involution``, kernel generated inside) counts its span convolution's multiply-adds as
well, so a model counts the same whichever op its layers call.

:func:`count_macs` reports multiply-adds as the paper does: the paper's FLOPs follow mmcv's
complexity counter, which adds to the convolution and linear multiply-adds one operation per
element for convolution biases, activations and pooling, and two for affine normalization.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, register_flop_formula

from ..ops import _library  # noqa: F401  (defines torch.ops.involution)

__all__ = ["count_macs"]

aten = torch.ops.aten


@register_flop_formula(torch.ops.involution.involution)
def _involution_flop(
    input_shape, kernel_shape, kernel_size, *args: Any, out_shape=None, **kwargs: Any
) -> int:
    return 2 * math.prod(out_shape) * math.prod(kernel_size)


@register_flop_formula(torch.ops.involution.grad_input)
def _grad_input_flop(
    grad_out_shape, kernel_shape, input_size, kernel_size, *args: Any, out_shape=None, **kwargs: Any
) -> int:
    return 2 * math.prod(grad_out_shape) * math.prod(kernel_size)


@register_flop_formula(torch.ops.involution.grad_kernel)
def _grad_kernel_flop(
    grad_out_shape, input_shape, kernel_size, *args: Any, out_shape=None, **kwargs: Any
) -> int:
    return 2 * math.prod(grad_out_shape) * math.prod(kernel_size)


def _span_macs(input_shape, features_shape, weight_shape) -> int:
    """Multiply-adds of the fused op's span: R (= weight_shape[1]) per kernel value."""
    return input_shape[0] * math.prod(features_shape[2:]) * weight_shape[0] * weight_shape[1]


def _fused_flop(
    input_shape,
    features_shape,
    weight_shape,
    bias_shape,
    kernel_size,
    *args: Any,
    out_shape=None,
    **kwargs: Any,
) -> int:
    aggregation = math.prod(out_shape) * math.prod(kernel_size)
    return 2 * (_span_macs(input_shape, features_shape, weight_shape) + aggregation)


# Registered apart from its definition: _fused_with_bias below calls the undecorated formula.
register_flop_formula(torch.ops.involution.fused_involution)(_fused_flop)


@register_flop_formula(torch.ops.involution.fused_involution_backward)
def _fused_backward_flop(
    grad_out_shape,
    input_shape,
    features_shape,
    weight_shape,
    bias_shape,
    kernel_size,
    *args: Any,
    out_shape=None,
    **kwargs: Any,
) -> int:
    # The span recomputed, grad_input and grad_kernel, then grad_features and grad_weight.
    aggregation = math.prod(grad_out_shape) * math.prod(kernel_size)
    return 2 * (3 * _span_macs(input_shape, features_shape, weight_shape) + 2 * aggregation)


# Element-wise costs of the paper's convention, in FlopCounterMode units (2 per operation, so
# that halving the total gives the paper's number).
def _conv_with_bias(
    x_shape,
    w_shape,
    bias,
    stride,
    padding,
    dilation,
    transposed,
    *args: Any,
    out_shape=None,
    **kwargs: Any,
) -> int:
    flops = conv_flop_count(x_shape, w_shape, out_shape, transposed=transposed)
    return flops + (2 * math.prod(out_shape) if bias is not None else 0)


def _fused_with_bias(
    input_shape, features_shape, weight_shape, bias_shape, *args: Any, out_shape=None, **kwargs: Any
) -> int:
    flops = _fused_flop(
        input_shape, features_shape, weight_shape, bias_shape, *args, out_shape=out_shape
    )
    if bias_shape is not None:  # one addition per kernel value, as for a convolution's bias
        flops += 2 * input_shape[0] * math.prod(features_shape[2:]) * weight_shape[0]
    return flops


def _per_output_element(*args: Any, out_shape=None, **kwargs: Any) -> int:
    return 2 * math.prod(out_shape)


def _per_input_element(input_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return 2 * math.prod(input_shape)


def _batch_norm(input_shape, weight_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return 2 * math.prod(input_shape) * (2 if weight_shape is not None else 1)


_ELEMENTWISE = {
    aten.convolution: _conv_with_bias,
    torch.ops.involution.fused_involution: _fused_with_bias,
    aten.relu: _per_output_element,
    aten.relu_: _per_output_element,
    aten.hardtanh: _per_output_element,
    aten.hardtanh_: _per_output_element,
    aten.leaky_relu: _per_output_element,
    aten.leaky_relu_: _per_output_element,
    aten.gelu: _per_output_element,
    aten.silu: _per_output_element,
    aten.silu_: _per_output_element,
    aten.native_batch_norm: _batch_norm,
    aten._native_batch_norm_legit: _batch_norm,
    aten._native_batch_norm_legit_no_training: _batch_norm,
    aten.cudnn_batch_norm: _batch_norm,
    aten.max_pool2d_with_indices: _per_input_element,
    aten.avg_pool2d: _per_input_element,
    aten._adaptive_avg_pool2d: _per_input_element,
    aten.mean: _per_input_element,
}


def count_macs(
    model: nn.Module,
    input_size: Sequence[int] = (1, 3, 224, 224),
    include_elementwise: bool = True,
) -> int:
    """Multiply-adds of one forward pass of ``model`` in eval mode, counted as in the paper.

    The model runs once on a random input on its own device and dtype; build it on the
    ``"meta"`` device (``with torch.device("meta"): ...``) to count without computing.

    Args:
        model: any module whose forward takes one tensor.
        input_size: shape of that tensor, batch included.
        include_elementwise: count, as the paper (mmcv's counter) does, one operation per element
            for convolution biases, activations and pooling and two for affine normalization.
            ``False`` counts only the multiply-adds of convolutions, linear layers, matrix
            products and the involution aggregation.

    Returns:
        The count for the whole batch.

    Example:
        >>> with torch.device("meta"):
        ...     model = create_model("rednet50")
        >>> count_macs(model) / 1e9  # the paper's 2.71 GFLOPs
        2.69...
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.randn(*input_size, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(
            display=False, custom_mapping=_ELEMENTWISE if include_elementwise else None
        )
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2

"""Functional involution (Li et al., "Involution: Inverting the Inherence of Convolution for
Visual Recognition", CVPR 2021, arXiv 2103.06255).

For an input ``x`` of shape (B, C, *spatial) and a per-pixel kernel ``w`` of shape
(B, G, K^n, *out), with channel ``c`` in group ``g(c) = c // (C // G)``::

    out[b, c, i] = sum_t w[b, g(c), t, i] * x[b, c, i * stride - padding + offset_t * dilation]

where ``t`` runs over the K^n kernel taps and ``x`` is zero outside its bounds. These functions
check their arguments, choose a backend (see ``ops/dispatch.py``) and call the registered op.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from .ops import _library, export_graph, reference, span
from .ops.dispatch import choose_backend, has_fused_passes

__all__ = [
    "fused_involution1d",
    "fused_involution2d",
    "fused_involution3d",
    "involution1d",
    "involution2d",
    "involution3d",
    "output_size",
    "resolve_geometry",
]

IntOrTuple = int | Sequence[int]
# What a padding argument may be: an int or tuple, "same", "valid", or None (meaning "same").
Padding = IntOrTuple | str | None
PADDING_MODES = ("same", "valid")


def _as_int(value: object, name: str) -> int:
    """``value`` as a Python int: ints and integer scalars (numpy, 0-dim tensors) pass.

    Raises:
        TypeError: a bool, a float or any other non-integer, naming ``name``.
    """
    # bool is an int subclass: Involution(64, True, 3) must not mean 1 output channel.
    if not isinstance(value, bool):
        try:
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise TypeError(f"{name} ({value!r}) must be an int, got {type(value).__name__}")


def _ntuple(value: IntOrTuple, n: int, name: str, minimum: int) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * n
    if len(values) != n:
        raise TypeError(f"{name} ({value!r}) must be an int or a tuple of {n} ints")
    try:
        ints = tuple(_as_int(v, name) for v in values)
    except TypeError:
        raise TypeError(f"{name} ({value!r}) must be an int or a tuple of {n} ints") from None
    if any(v < minimum for v in ints):
        raise ValueError(f"{name} ({value!r}) must be >= {minimum}")
    return ints


def resolve_geometry(
    n: int,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: Padding = None,
    dilation: IntOrTuple = 1,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Checks and expands the geometry arguments of an ``n``-dimensional involution.

    ``padding`` is an int or a tuple of ``n`` ints, or a mode as in ``nn.Conv2d``: ``"valid"``
    is 0 and ``"same"`` (or ``None``) is ``dilation * (kernel_size - 1) // 2`` on each side,
    which needs ``dilation * (kernel_size - 1)`` even (an odd kernel size, or an even dilation).
    With stride 1 "same" keeps the input size; with a stride s it gives ceil(size / s) (where
    ``nn.Conv2d`` refuses "same"), which is how RedNet downsamples.

    Returns:
        ``(kernel_size, stride, padding, dilation)``, each a tuple of ``n`` ints.

    Raises:
        TypeError: an argument is not an int (bools and floats are not) or a tuple of ``n``
            ints, or padding is a string other than "same" and "valid".
        ValueError: kernel_size, stride or dilation < 1, padding < 0, a padding mode not
            among "same" and "valid", or "same" with an even ``dilation * (kernel_size - 1)``.
    """
    ks = _ntuple(kernel_size, n, "kernel_size", 1)
    st = _ntuple(stride, n, "stride", 1)
    dil = _ntuple(dilation, n, "dilation", 1)
    if isinstance(padding, str) and padding not in PADDING_MODES:
        raise ValueError(
            f"padding ({padding!r}) must be an int, a tuple of {n} ints, 'same' or 'valid'"
        )
    if padding is None or padding == "same":
        span = tuple(d * (k - 1) for k, d in zip(ks, dil, strict=True))
        if any(s % 2 for s in span):
            raise ValueError(
                f"kernel_size ({kernel_size!r}) with dilation ({dilation!r}) cannot have 'same' "
                "padding: dilation * (kernel_size - 1) must be even; give an explicit padding"
            )
        pad = tuple(s // 2 for s in span)
    elif padding == "valid":
        pad = (0,) * n
    else:
        pad = _ntuple(padding, n, "padding", 0)  # type: ignore[arg-type]
    return ks, st, pad, dil


def output_size(
    input_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> tuple[int, ...]:
    """Spatial output size, as for a convolution with the same geometry.

    Raises:
        ValueError: the output would be empty (the input is smaller than the dilated kernel).
    """
    out = tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(input_size, kernel_size, stride, padding, dilation, strict=True)
    )
    if any(o <= 0 for o in out):
        raise ValueError(
            f"output size {out} must be positive: input size {tuple(input_size)} is too small for "
            f"kernel_size {tuple(kernel_size)}, dilation {tuple(dilation)}, "
            f"padding {tuple(padding)}"
        )
    return out


def _check_tensors(
    n: int, input: torch.Tensor, kernel: torch.Tensor, geometry: tuple[tuple[int, ...], ...]
) -> None:
    kernel_size = geometry[0]
    for name, tensor, rank in (("input", input, n + 2), ("kernel", kernel, n + 3)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != rank:
            raise ValueError(
                f"{name} must have {rank} dimensions for involution{n}d, "
                f"got shape {tuple(tensor.shape)}"
            )
    if kernel.dtype != input.dtype:
        raise TypeError(f"kernel dtype ({kernel.dtype}) must match input dtype ({input.dtype})")
    if kernel.device != input.device:
        raise ValueError(
            f"kernel device ({kernel.device}) must match input device ({input.device})"
        )
    if not input.is_floating_point():
        raise TypeError(f"input dtype ({input.dtype}) must be a floating-point type")
    batch, channels = input.shape[:2]
    groups = kernel.shape[1]
    if groups < 1 or channels % groups != 0:
        raise ValueError(
            f"kernel shape {tuple(kernel.shape)} does not fit input shape {tuple(input.shape)}: "
            f"its groups (dimension 1: {groups}) must divide the {channels} input channels"
        )
    expected = (
        batch,
        groups,
        math.prod(kernel_size),
        *output_size(input.shape[2:], *geometry),
    )
    if tuple(kernel.shape) != expected:
        raise ValueError(
            f"kernel shape {tuple(kernel.shape)} does not fit input shape {tuple(input.shape)}: "
            f"expected (batch, groups, prod(kernel_size), *output_size) = {expected}"
        )


def _autocast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Casts to the autocast dtype when ``torch.autocast`` is on for the first tensor's device.

    Involution is treated like a convolution under autocast: float32 (and other low-precision)
    arguments run in the autocast dtype, the kernels accumulate in float32, float64 is left
    alone. Casting here, rather than letting the op upcast, keeps the memory traffic halved.
    """
    first = tensors[0]
    if not all(t is None or isinstance(t, torch.Tensor) for t in tensors) or first is None:
        return tensors
    device = first.device.type
    # Devices without autocast (meta, for shape-only passes such as FLOP counting) run as given.
    # torch.compile cannot trace is_autocast_available before torch 2.13, and compiles only
    # for devices that have autocast.
    if not (torch.compiler.is_compiling() or torch.amp.is_autocast_available(device)):
        return tensors
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or not t.is_floating_point() or t.dtype == torch.float64:
            return t
        return t.to(dtype)

    return tuple(cast(t) for t in tensors)


def _involution(
    n: int,
    input: torch.Tensor,
    kernel: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple,
    padding: IntOrTuple | None,
    dilation: IntOrTuple,
    backend: str,
) -> torch.Tensor:
    geometry = resolve_geometry(n, kernel_size, stride, padding, dilation)
    input, kernel = _autocast(input, kernel)  # type: ignore[assignment]
    _check_tensors(n, input, kernel, geometry)
    return _run(input, kernel, geometry, choose_backend(input, kernel, backend))


def _run(
    input: torch.Tensor,
    kernel: torch.Tensor,
    geometry: tuple[tuple[int, ...], ...],
    chosen: str,
) -> torch.Tensor:
    """The involution of checked tensors on the chosen backend."""
    form = export_graph.traced_form()
    if form == "aten":
        # Exported programs carry standard operators only, so that their consumers need no
        # custom op: a Gather and a MatMul per layer (ops/export_graph.py).
        return export_graph.forward(input, kernel, *geometry)
    if chosen == "reference" and form is None:
        return reference.involution(input, kernel, *geometry)
    # Traced for ONNX, the op stays one node that export_graph translates.
    return _library.involution(input, kernel, *geometry, chosen)


def involution1d(
    input: torch.Tensor,
    kernel: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | None = None,
    dilation: IntOrTuple = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """1D involution; see :func:`involution2d`. ``input`` is (B, C, L), ``kernel`` (B, G, K, Lo)."""
    return _involution(1, input, kernel, kernel_size, stride, padding, dilation, backend)


def involution2d(
    input: torch.Tensor,
    kernel: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | None = None,
    dilation: IntOrTuple = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Applies a per-pixel kernel shared by the channels of each group.

    Args:
        input: (B, C, H, W).
        kernel: (B, G, K*K, Ho, Wo); G must divide C; tap ``u*K + v`` weighs the input pixel
            at row offset ``u * dilation`` and column offset ``v * dilation``.
        kernel_size: K, or (Kh, Kw).
        stride: step between output pixels.
        padding: zero padding on each side; ``None`` means ``dilation * (K - 1) // 2``.
        dilation: spacing between kernel taps.
        backend: "auto" (fastest available), or one of ``ops.dispatch.BACKENDS``.

    Returns:
        (B, C, Ho, Wo), Ho = (H + 2 * padding - dilation * (K - 1) - 1) // stride + 1.

    Raises:
        TypeError: a non-tensor, non-floating or mismatched dtype, or a malformed geometry value.
        ValueError: wrong ranks, a kernel shape that does not fit, an empty output, devices that
            differ, or an unknown backend.
        RuntimeError: the named backend cannot run these tensors.

    Example:
        >>> x = torch.randn(2, 32, 9, 9)
        >>> w = torch.randn(2, 2, 9, 9, 9)
        >>> involution2d(x, w, kernel_size=3).shape
        torch.Size([2, 32, 9, 9])
    """
    return _involution(2, input, kernel, kernel_size, stride, padding, dilation, backend)


def involution3d(
    input: torch.Tensor,
    kernel: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | None = None,
    dilation: IntOrTuple = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """3D involution; see :func:`involution2d`. ``kernel`` is (B, G, K^3, Do, Ho, Wo)."""
    return _involution(3, input, kernel, kernel_size, stride, padding, dilation, backend)


def _check_generator(
    n: int,
    input: torch.Tensor,
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    geometry: tuple[tuple[int, ...], ...],
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Checks the fused op's tensors.

    Returns:
        The weight as a (G * K^n, R) matrix, and the shape (B, G, K^n, *out) of the kernel.
    """
    taps = math.prod(geometry[0])
    for name, tensor in (("input", input), ("features", features), ("weight", weight)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    for name, tensor in (("input", input), ("features", features)):
        if tensor.dim() != n + 2:
            raise ValueError(
                f"{name} must have {n + 2} dimensions for fused_involution{n}d, "
                f"got shape {tuple(tensor.shape)}"
            )
    if not input.is_floating_point():
        raise TypeError(f"input dtype ({input.dtype}) must be a floating-point type")
    named: list[tuple[str, torch.Tensor | None]] = [
        ("features", features),
        ("weight", weight),
        ("bias", bias),
    ]
    for name, value in named:
        if value is None:
            continue
        if value.dtype != input.dtype:
            raise TypeError(f"{name} dtype ({value.dtype}) must match input dtype ({input.dtype})")
        if value.device != input.device:
            raise ValueError(
                f"{name} device ({value.device}) must match input device ({input.device})"
            )
    if not (weight.dim() == 2 or (weight.dim() == n + 2 and weight.shape[2:] == (1,) * n)):
        raise ValueError(
            f"weight shape {tuple(weight.shape)} must be (groups * {taps}, features) or "
            f"(groups * {taps}, features{', 1' * n}) for kernel_size {geometry[0]}"
        )
    rows, hidden = weight.shape[:2]
    batch, channels = input.shape[:2]
    groups = rows // taps
    if rows % taps != 0 or groups < 1 or channels % groups != 0:
        raise ValueError(
            f"weight shape {tuple(weight.shape)} must have groups * {taps} rows for "
            f"kernel_size {geometry[0]}, with groups dividing the {channels} input channels"
        )
    out = output_size(input.shape[2:], *geometry)
    if tuple(features.shape) != (batch, hidden, *out):
        raise ValueError(
            f"features shape {tuple(features.shape)} does not fit: expected (batch, weight's "
            f"{hidden} features, *output_size) = {(batch, hidden, *out)}"
        )
    if bias is not None and tuple(bias.shape) != (rows,):
        raise ValueError(f"bias shape {tuple(bias.shape)} must be ({rows},), one per weight row")
    return weight.reshape(rows, hidden), (batch, groups, taps, *out)


def _fused_involution(
    n: int,
    input: torch.Tensor,
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: IntOrTuple,
    stride: IntOrTuple,
    padding: IntOrTuple | None,
    dilation: IntOrTuple,
    backend: str,
    native_only: bool = False,
) -> torch.Tensor:
    """The fused op; ``native_only`` composes the span and the involution instead (the kernel is
    then stored, not recomputed in the backward) unless the backend has native fused passes."""
    geometry = resolve_geometry(n, kernel_size, stride, padding, dilation)
    input, features, weight, bias = _autocast(input, features, weight, bias)  # type: ignore[assignment]
    matrix, kernel_shape = _check_generator(n, input, features, weight, bias, geometry)
    # The backend is chosen as for the kernel this op never stores (dispatch reads its shape).
    chosen = choose_backend(input, input.new_empty(()).expand(kernel_shape), backend)
    form = export_graph.traced_form()
    compose = chosen == "reference" or (native_only and not has_fused_passes(chosen))
    # Traced for ONNX, the op stays one node whatever the backend: it is translated, not run.
    if form == "aten" or (compose and form is None):
        return _run(input, span.span(features, matrix, bias, kernel_shape[2]), geometry, chosen)
    return _library.fused_involution(input, features, matrix, bias, *geometry, chosen)


def fused_involution1d(
    input: torch.Tensor,
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | None = None,
    dilation: IntOrTuple = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """1D fused involution; see :func:`fused_involution2d`. ``features`` is (B, R, Lo)."""
    return _fused_involution(
        1, input, features, weight, bias, kernel_size, stride, padding, dilation, backend
    )


def fused_involution2d(
    input: torch.Tensor,
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | None = None,
    dilation: IntOrTuple = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Involution whose per-pixel kernel is generated from hidden features inside the op.

    Computes exactly ``involution2d(input, conv1x1(features, weight, bias).view(B, G, K*K, Ho,
    Wo), ...)``, without storing the kernel for the backward: backends with fused passes
    generate it on chip; the others compose the 1x1 convolution with the involution and
    recompute the kernel in the backward. Gradients flow to input, features, weight and bias.

    Args:
        input: (B, C, H, W).
        features: (B, R, Ho, Wo), the kernel generator's hidden features (after its reduction,
            normalization and activation).
        weight: (G*K*K, R) or (G*K*K, R, 1, 1), the span convolution's weight; G must divide C.
        bias: (G*K*K,), or None.
        kernel_size, stride, padding, dilation, backend: as in :func:`involution2d`.

    Returns:
        (B, C, Ho, Wo), in the input's memory format.

    Raises:
        TypeError: a non-tensor, non-floating or mismatched dtype, or a malformed geometry value.
        ValueError: wrong ranks or shapes that do not fit together, an empty output, devices
            that differ, or an unknown backend.
        RuntimeError: the named backend cannot run these tensors.

    Example:
        >>> x, features = torch.randn(2, 32, 9, 9), torch.randn(2, 8, 9, 9)
        >>> weight, bias = torch.randn(2 * 9, 8), torch.randn(2 * 9)
        >>> fused_involution2d(x, features, weight, bias, kernel_size=3).shape
        torch.Size([2, 32, 9, 9])
    """
    return _fused_involution(
        2, input, features, weight, bias, kernel_size, stride, padding, dilation, backend
    )


def fused_involution3d(
    input: torch.Tensor,
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: IntOrTuple | None = None,
    dilation: IntOrTuple = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """3D fused involution; see :func:`fused_involution2d`. ``features`` is (B, R, Do, Ho, Wo)."""
    return _fused_involution(
        3, input, features, weight, bias, kernel_size, stride, padding, dilation, backend
    )

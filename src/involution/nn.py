"""Involution layers: per-pixel kernel generation plus a call to :mod:`involution.functional`.

The kernel of each output pixel is generated from the input at that pixel (Li et al., CVPR 2021,
Eq. 6): ``span(act(norm(reduce(pool(x)))))``, where ``reduce`` is a 1x1 convolution C -> C/r
without bias, ``span`` a 1x1 convolution C/r -> K^n * G with bias, and ``pool`` an average pool
with kernel = stride when the stride is > 1. Pooling uses ceil mode, so that odd sizes get one
kernel per output pixel (on even sizes this is the authors' AvgPool exactly).

"At that pixel" means at the centre of the output pixel's window: output ``i`` covers input
``i * stride - padding + [0, dilation * (K - 1)]``, whose centre is ``i * stride + c`` with
``c = dilation * (K - 1) // 2 - padding``. With "same" padding ``c = 0`` and the input is pooled
as it is (the authors' layer); otherwise it is first cropped by ``c`` (or, when the padding
exceeds half the window, zero-padded by ``-c``), so that e.g. with padding 0 the kernel of output
(0, 0) comes from input pixel (K // 2, K // 2). Pooling averages the pixels of each stride block
that lie in the image; a block wholly in the padding gives zero features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .functional import (
    IntOrTuple,
    Padding,
    _as_int,
    _fused_involution,
    output_size,
    resolve_geometry,
)
from .ops import layout
from .ops.dispatch import BACKENDS

__all__ = [
    "OFFICIAL_KEY_PREFIXES",
    "Involution",
    "Involution1d",
    "Involution2d",
    "Involution3d",
    "convert_official_state_dict",
]

# Submodule names of the authors' ``involution`` module (d-li14/involution) -> ours.
OFFICIAL_KEY_PREFIXES = {"conv1.conv.": "reduce.", "conv1.bn.": "norm.", "conv2.conv.": "span."}

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_BATCH_NORMS = tuple(_NORM.values())
_AVG_POOL: dict[int, Callable[..., torch.Tensor]] = {
    1: F.avg_pool1d,
    2: F.avg_pool2d,
    3: F.avg_pool3d,
}


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames the keys of one authors' involution module to this library's names.

    ``conv1.conv.weight -> reduce.weight``, ``conv1.bn.* -> norm.*``, ``conv2.conv.* -> span.*``.

    Raises:
        KeyError: a key that belongs to no known submodule; nothing is returned half-renamed.
    """
    renamed = {}
    for key, value in state_dict.items():
        prefix = next((p for p in OFFICIAL_KEY_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise KeyError(
                f"state_dict key {key!r} is not a key of the official involution module "
                f"(expected a prefix among {list(OFFICIAL_KEY_PREFIXES)})"
            )
        renamed[OFFICIAL_KEY_PREFIXES[prefix] + key[len(prefix) :]] = value
    return renamed


def _positive_int(value: object, name: str) -> int:
    value = _as_int(value, name)
    if value < 1:
        raise ValueError(f"{name} ({value!r}) must be a positive int")
    return value


class _InvolutionNd(nn.Module):
    _ndim: int

    def __init__(
        self,
        channels: int,
        kernel_size: IntOrTuple = 7,
        stride: IntOrTuple = 1,
        padding: Padding = "same",
        dilation: IntOrTuple = 1,
        group_channels: int = 16,
        reduction_ratio: int = 4,
        out_channels: int | None = None,
        norm_layer: Callable[[int], nn.Module] | None = None,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n = self._ndim
        channels = _positive_int(channels, "channels")
        group_channels = _positive_int(group_channels, "group_channels")
        reduction_ratio = _positive_int(reduction_ratio, "reduction_ratio")
        if out_channels is not None:
            out_channels = _positive_int(out_channels, "out_channels")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend ({backend!r}) must be 'auto' or one of {BACKENDS}")
        if channels % group_channels != 0:
            raise ValueError(
                f"channels ({channels}) must be divisible by group_channels ({group_channels})"
            )
        if channels // reduction_ratio == 0:
            raise ValueError(
                f"channels // reduction_ratio ({channels} // {reduction_ratio}) must be >= 1"
            )
        self.kernel_size, self.stride, self.padding, self.dilation = resolve_geometry(
            n, kernel_size, stride, padding, dilation
        )
        self.channels = channels
        self.out_channels = channels if out_channels is None else out_channels
        self.group_channels = group_channels
        self.groups = channels // group_channels
        self.reduction_ratio = reduction_ratio
        self.backend = backend
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        mid = channels // reduction_ratio
        conv = _CONV[n]
        self.reduce = conv(channels, mid, 1, bias=False, **factory)
        self.norm = (_NORM[n] if norm_layer is None else norm_layer)(mid).to(**factory)
        self.act = act_layer()
        self.span = conv(mid, math.prod(self.kernel_size) * self.groups, 1, **factory)
        self.proj = (
            conv(channels, self.out_channels, 1, **factory)
            if self.out_channels != channels
            else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initializes every parameter and normalization statistic, like a fresh module."""
        for module in self.children():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != self._ndim + 2:
            raise ValueError(
                f"input must have {self._ndim + 2} dimensions (batch, channels, "
                f"{self._ndim} spatial) for {type(self).__name__}, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.channels:
            raise ValueError(
                f"input channels ({x.shape[1]}) must equal the module's channels ({self.channels})"
            )

    def _centres(self, x: torch.Tensor, out: tuple[int, ...]) -> torch.Tensor:
        """The input the kernels are generated from, one pixel per output: (B, C, *out).

        Each output pixel gets the mean of the in-image pixels of the stride block that starts
        at its window's centre (see the module docstring). Every crop, pad and slice here has
        a size fixed by the geometry, not by the input size, so that exported graphs keep
        dynamic sizes.
        """
        n = self._ndim
        spans = [d * (k - 1) for k, d in zip(self.kernel_size, self.dilation, strict=True)]
        shifts = [s // 2 - p for s, p in zip(spans, self.padding, strict=True)]
        y = x
        for dim, c in enumerate(shifts, start=2):
            if c > 0:
                y = y.narrow(dim, c, y.shape[dim] - c)
        outside = [max(-c, 0) for c in shifts]
        strided = any(s > 1 for s in self.stride)
        if any(outside):
            # Centres in the padding: zeros there, and a mask to average in-image pixels only.
            pad = [p for c in reversed(outside) for p in (c, c)]
            inside = F.pad(x.new_ones((1, 1, *y.shape[2:])), pad) if strided else None
            y = F.pad(y, pad)
        if strided:
            pool = _AVG_POOL[n]
            y = pool(y, self.stride, self.stride, ceil_mode=True)
            if any(outside):
                assert inside is not None
                weight = pool(inside, self.stride, self.stride, ceil_mode=True)
                y = y / weight.clamp_min(1 / math.prod(self.stride))
        for dim, (c, s, o) in enumerate(zip(shifts, spans, out, strict=True), start=2):
            if c != 0 or s % 2:
                # Not "same" padding: blocks beyond the last output's window are dropped.
                y = y.narrow(dim, 0, o)
        return y

    def kernel_features(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel generator's hidden features for input ``x``: (B, C / r, *output_size).

        ``act(norm(reduce(centres)))``: :meth:`generate_kernel` is ``span`` of these.
        """
        self._check_input(x)
        out = output_size(x.shape[2:], self.kernel_size, self.stride, self.padding, self.dilation)
        return self.act(_normalize(self.norm, self.reduce(self._centres(x, out))))

    def generate_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The per-pixel kernel for input ``x``: (B, groups, K^n, *output_size).

        Tap ``t`` of the K^n axis is the row-major index of the kernel offset, so
        ``kernel.unflatten(2, module.kernel_size)`` gives a K x K (x K) view per pixel and group.
        The kernel of an output pixel is generated from the centre of its window (see the
        module docstring).
        """
        kernel = self.span(self.kernel_features(x))
        return kernel.reshape(
            x.shape[0], self.groups, math.prod(self.kernel_size), *kernel.shape[2:]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fused op where the backend computes it natively (the kernel never stored); the
        # span convolution then the involution elsewhere, as generate_kernel() does.
        out = _fused_involution(
            self._ndim,
            x,
            self.kernel_features(x),
            self.span.weight,
            self.span.bias,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.backend,
            native_only=True,
        )
        return out if self.proj is None else self.proj(out)

    def extra_repr(self) -> str:
        n = self._ndim
        same = tuple(d * (k - 1) // 2 for k, d in zip(self.kernel_size, self.dilation, strict=True))
        parts = [f"{self.channels}", f"kernel_size={self.kernel_size}"]
        if self.out_channels != self.channels:
            parts.append(f"out_channels={self.out_channels}")
        if self.stride != (1,) * n:
            parts.append(f"stride={self.stride}")
        if self.padding != same:
            parts.append(f"padding={self.padding}")
        if self.dilation != (1,) * n:
            parts.append(f"dilation={self.dilation}")
        parts.append(f"groups={self.groups}")
        if self.reduction_ratio != 4:
            parts.append(f"reduction_ratio={self.reduction_ratio}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


def _normalize(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` for the kernel generator's hidden features, in ``x``'s memory format.

    A BatchNorm of fewer than 16 channels on a channels-last CPU tensor runs on a contiguous copy
    instead: ATen's channels-last kernels vectorize across channels, so with the few hidden
    channels of a narrow model (C / r: 2 to 8 in the demo's RedNet-26) they are several times
    slower than on the same values in NCHW (training forward+backward at 32x4x32x32: 1.65 ms
    against 0.23 ms; BENCHMARKS.md), far more than the two copies cost.
    """
    if (
        isinstance(norm, _BATCH_NORMS)
        and x.device.type == "cpu"
        and x.shape[1] < 16
        and layout.channels_last(x)
    ):
        return layout.like_input(norm(x.contiguous()), x)
    return norm(x)


class Involution1d(_InvolutionNd):
    """1D involution layer on (B, C, L) inputs; arguments as :class:`Involution2d`."""

    _ndim = 1


class Involution2d(_InvolutionNd):
    """2D involution layer (Li et al., CVPR 2021) on (B, C, H, W) inputs.

    Args:
        channels: input channels C.
        kernel_size: K of the K x K per-pixel kernel.
        stride: output stride; the kernel is generated from the average-pooled input.
        padding: zero padding on each side: an int or tuple, ``"valid"`` (0), or ``"same"``
            (the default, ``dilation * (K - 1) // 2``: the output is ceil(H / stride)).
            ``None`` is accepted as "same". Each kernel is generated at its window's centre.
        dilation: spacing between kernel taps.
        group_channels: channels that share one kernel; groups = channels // group_channels.
        reduction_ratio: bottleneck reduction r of the kernel generator (C -> C / r).
        out_channels: when not ``channels``, a 1x1 convolution projects to this width.
        norm_layer: factory of the bottleneck normalization, called with C / r; default
            ``nn.BatchNorm2d``; ``nn.Identity`` to drop it.
        act_layer: factory of the bottleneck activation; default ``nn.ReLU``.
        backend: as in :func:`involution.functional.involution2d`.
        device, dtype: of the parameters.

    Example:
        >>> layer = Involution2d(64, kernel_size=7, stride=2)
        >>> layer(torch.randn(2, 64, 15, 15)).shape
        torch.Size([2, 64, 8, 8])

    The authors' module state_dict loads after :func:`convert_official_state_dict`.
    """

    _ndim = 2


class Involution3d(_InvolutionNd):
    """3D involution layer on (B, C, D, H, W) inputs; arguments as :class:`Involution2d`."""

    _ndim = 3


class Involution(Involution2d):
    """2D involution with the seed document's signature and defaults, as ``nn.Conv2d``'s.

    ``Involution(in_channels, out_channels, kernel_size, stride=1, padding=0)``: like a
    convolution, padding 0 shrinks the output (a 3 x 3 kernel turns 16 x 16 into 14 x 14);
    ``padding="same"`` keeps the size. ``Involution(32, 64, 3, padding=1)`` is
    ``Involution2d(32, kernel_size=3, padding=1, out_channels=64)``; other keyword arguments
    (``dilation``, ``group_channels``, ``reduction_ratio``, ``backend`` ...) are
    :class:`Involution2d`'s.

    Example:
        >>> Involution(64, 64, 3)(torch.randn(1, 64, 16, 16)).shape
        torch.Size([1, 64, 14, 14])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: Padding = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            in_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            out_channels=out_channels,
            **kwargs,
        )

"""Involution layers: per-pixel kernel generation plus a call to :mod:`involution.functional`.

The kernel of each output pixel is generated from the input at that pixel (Li et al., CVPR 2021,
Eq. 6): ``span(act(norm(reduce(pool(x)))))``, where ``reduce`` is a 1x1 convolution C -> C/r
without bias, ``span`` a 1x1 convolution C/r -> K^n * G with bias, and ``pool`` an average pool
with kernel = stride when the stride is > 1. Pooling uses ceil mode, so that odd sizes get one
kernel per output pixel (on even sizes this is the authors' AvgPool exactly).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .functional import IntOrTuple, _involution, output_size, resolve_geometry

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
_AVG_POOL: dict[int, Callable[..., torch.Tensor]] = {
    1: F.avg_pool1d,
    2: F.avg_pool2d,
    3: F.avg_pool3d,
}
_ADAPTIVE_POOL: dict[int, Callable[..., torch.Tensor]] = {
    1: F.adaptive_avg_pool1d,
    2: F.adaptive_avg_pool2d,
    3: F.adaptive_avg_pool3d,
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


class _InvolutionNd(nn.Module):
    _ndim: int

    def __init__(
        self,
        channels: int,
        kernel_size: IntOrTuple = 7,
        stride: IntOrTuple = 1,
        padding: IntOrTuple | None = None,
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
        for name, value in (
            ("channels", channels),
            ("group_channels", group_channels),
            ("reduction_ratio", reduction_ratio),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive int")
        if channels % group_channels != 0:
            raise ValueError(
                f"channels ({channels}) must be divisible by group_channels ({group_channels})"
            )
        if channels // reduction_ratio == 0:
            raise ValueError(
                f"channels // reduction_ratio ({channels} // {reduction_ratio}) must be >= 1"
            )
        if out_channels is not None and (not isinstance(out_channels, int) or out_channels < 1):
            raise ValueError(f"out_channels ({out_channels!r}) must be a positive int or None")
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

    def generate_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The per-pixel kernel for input ``x``: (B, groups, K^n, *output_size).

        Tap ``t`` of the K^n axis is the row-major index of the kernel offset, so
        ``kernel.unflatten(2, module.kernel_size)`` gives a K x K (x K) view per pixel and group.
        """
        self._check_input(x)
        out = output_size(x.shape[2:], self.kernel_size, self.stride, self.padding, self.dilation)
        y = x
        if any(s > 1 for s in self.stride):
            y = _AVG_POOL[self._ndim](y, self.stride, self.stride, ceil_mode=True)
        if tuple(y.shape[2:]) != out:
            # Only with an explicit padding other than "same": one kernel per output pixel.
            y = _ADAPTIVE_POOL[self._ndim](y, out)
        kernel = self.span(self.act(self.norm(self.reduce(y))))
        return kernel.reshape(x.shape[0], self.groups, math.prod(self.kernel_size), *out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.generate_kernel(x)
        out = _involution(
            self._ndim,
            x,
            kernel,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.backend,
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


class Involution1d(_InvolutionNd):
    """1D involution layer on (B, C, L) inputs; arguments as :class:`Involution2d`."""

    _ndim = 1


class Involution2d(_InvolutionNd):
    """2D involution layer (Li et al., CVPR 2021) on (B, C, H, W) inputs.

    Args:
        channels: input channels C.
        kernel_size: K of the K x K per-pixel kernel.
        stride: output stride; the kernel is generated from the average-pooled input.
        padding: zero padding; ``None`` keeps the output at ceil(H / stride).
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
    """2D involution with the seed document's signature.

    ``Involution(in_channels=32, out_channels=64, kernel_size=3, stride=1, padding=1)`` is
    ``Involution2d(32, kernel_size=3, padding=1, out_channels=64)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        kernel_size: IntOrTuple = 7,
        stride: IntOrTuple = 1,
        padding: IntOrTuple | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            in_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            out_channels=out_channels,
            **kwargs,
        )

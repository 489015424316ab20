"""The involution op against convolutions at the same shape: time, peak memory, bandwidth.

For one input shape (B, C, H, W) and kernel size K, each candidate runs on random tensors:

* ``involution[<backend>]``: :func:`involution.functional.involution2d` with a random kernel
  (B, C/group_channels, K*K, Ho, Wo), for each backend asked for;
* ``conv2d depthwise``: a K x K depthwise convolution (C filters of K x K), the usual yardstick of
  involution's cost: the same multiply-adds per output as involution with one channel per group;
* ``conv2d dense``: a K x K convolution C -> C, what involution replaces in a network.

Each candidate is measured in three passes: ``forward`` (no autograd), ``backward`` (the gradients
of the input and of the kernel or weight, from a fixed forward graph) and ``forward+backward``.
With ``channels_last``, every input is channels-last and the involution kernel pixel-major (the
layout a channels-last span convolution produces, see ``ops/layout.py``), as in a channels-last
network; otherwise all are contiguous (NCHW).

The floor of a pass is the time needed just to move the bytes it cannot avoid (each operand and
result read or written once: input, kernel or weight, output; in backward also the output
gradient and the two input gradients) at the bandwidth of a large tensor copy (bytes read + bytes
written). The copy is timed right after each pass, not once per run: on a shared machine whose
speed drifts, a copy timed minutes earlier moves every floor ratio (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..functional import involution2d
from ..ops import layout
from ..ops.dispatch import BACKENDS, choose_backend
from .memory import peak_memory
from .timing import measure_time

__all__ = [
    "BASELINES",
    "PASSES",
    "REDNET_SHAPES",
    "OpShape",
    "available_backends",
    "benchmark_op",
    "copy_bandwidth",
]

logger = logging.getLogger(__name__)

PASSES = ("forward", "backward", "forward+backward")
BASELINES = ("depthwise", "dense")
_MiB = 1 << 20


@dataclass(frozen=True)
class OpShape:
    """An input shape (batch, channels, height, width)."""

    batch: int
    channels: int
    height: int
    width: int

    @classmethod
    def parse(cls, text: str) -> OpShape:
        """Reads ``"BxCxHxW"``, e.g. ``"8x64x56x56"``.

        Raises:
            ValueError: not four positive integers separated by "x".
        """
        parts = text.lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shape ({text!r}) must be four positive integers BxCxHxW")
        return cls(*(int(p) for p in parts))

    def __str__(self) -> str:
        return f"{self.batch}x{self.channels}x{self.height}x{self.width}"


# The involution inputs of RedNet's four stages at 224 x 224 with a batch of 8, and issue 2's
# target shape (the stage-1 width of the bottleneck's expansion, 256 channels, at 56 x 56).
REDNET_SHAPES = tuple(
    OpShape.parse(s) for s in ("8x64x56x56", "8x128x28x28", "8x256x14x14", "8x256x56x56")
)


def available_backends(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> list[str]:
    """The involution backends (of ``ops.dispatch.BACKENDS``) that can run on ``device``."""
    usable = []
    for name in BACKENDS:
        why = _why_not(name, device, dtype)
        if why is None:
            usable.append(name)
        else:
            logger.info("skipping backend %s: %s", name, why)
    return usable


def _why_not(backend: str, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run on ``device`` in ``dtype``; None where it can."""
    probe = torch.ones(1, 1, 1, 1, device=device, dtype=dtype)
    try:
        choose_backend(probe, probe.view(1, 1, 1, 1, 1), backend)
    except RuntimeError as error:
        return str(error)
    return None


def copy_bandwidth(
    device: torch.device | str = "cpu",
    nbytes: int = 256 * _MiB,
    warmup: int = 2,
    repeats: int = 10,
) -> float:
    """Measured bytes per second of a large tensor copy (bytes read + bytes written).

    Args:
        device: where to copy.
        nbytes: size of the copied tensor; it must be much larger than the caches.
        warmup, repeats: as in :func:`involution.benchmark.measure_time`.

    Raises:
        ValueError: ``nbytes`` < 4.
    """
    source, target = _copy_operands(device, nbytes, "nbytes")
    return _copy_rate(source, target, warmup, repeats)


def _copy_operands(
    device: torch.device | str, nbytes: int, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if nbytes < 4:
        raise ValueError(f"{name} ({nbytes}) must be >= 4")
    source = torch.randn(nbytes // 4, device=device)
    return source, torch.empty_like(source)


def _copy_rate(source: torch.Tensor, target: torch.Tensor, warmup: int, repeats: int) -> float:
    timing = measure_time(lambda: target.copy_(source), source.device, warmup, repeats)
    return 2 * source.nbytes / timing.median


@dataclass
class _Candidate:
    name: str
    operands: tuple[torch.Tensor, ...]  # inputs that get a gradient: (input, kernel or weight)
    fn: Callable[..., torch.Tensor]
    output_bytes: int  # every candidate maps (B, C, H, W) to (B, C, Ho, Wo)


def _candidates(
    shape: OpShape,
    kernel_size: int,
    stride: int,
    group_channels: int,
    dtype: torch.dtype,
    device: torch.device,
    backends: Sequence[str],
    baselines: Sequence[str],
    channels_last: bool,
) -> list[_Candidate]:
    b, c, h, w = shape.batch, shape.channels, shape.height, shape.width
    k, pad = kernel_size, (kernel_size - 1) // 2
    out_h, out_w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"shape ({shape}) is too small for kernel_size {k}")
    out_bytes = b * c * out_h * out_w * torch.empty((), dtype=dtype).element_size()

    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def operands(*shapes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.randn(s, device=device, dtype=dtype)
            .contiguous(memory_format=fmt)
            .requires_grad_()
            for s in shapes
        )

    def involution_operands() -> tuple[torch.Tensor, ...]:
        (x,) = operands((b, c, h, w))
        kernel = layout.empty_kernel(
            (b, c // group_channels, k * k, out_h, out_w), x, pixel_major=channels_last
        )
        return x, kernel.normal_().requires_grad_()

    candidates = []
    for backend in backends:
        candidates.append(
            _Candidate(
                f"involution[{backend}]",
                involution_operands(),
                lambda x, wk, backend=backend: involution2d(x, wk, k, stride, backend=backend),
                out_bytes,
            )
        )
    for baseline in baselines:
        groups = c if baseline == "depthwise" else 1
        candidates.append(
            _Candidate(
                f"conv2d {baseline}",
                operands((b, c, h, w), (c, c // groups, k, k)),
                lambda x, wt, groups=groups: F.conv2d(x, wt, None, stride, pad, 1, groups),
                out_bytes,
            )
        )
    return candidates


def _pass_fn(candidate: _Candidate, pass_name: str) -> Callable[[], object]:
    ops, fn = candidate.operands, candidate.fn
    if pass_name == "forward":

        def forward() -> object:
            with torch.no_grad():
                return fn(*ops)

        return forward
    out = fn(*ops)
    grad_out = torch.randn_like(out)
    if pass_name == "backward":
        # The graph of one forward is kept and differentiated again at every call.
        return functools.partial(torch.autograd.grad, out, ops, grad_out, retain_graph=True)

    def forward_backward() -> object:
        return torch.autograd.grad(fn(*ops), ops, grad_out)

    return forward_backward


def _bytes_moved(candidate: _Candidate, pass_name: str) -> int:
    operand_bytes = sum(t.nbytes for t in candidate.operands)
    forward = operand_bytes + candidate.output_bytes
    backward = (
        candidate.output_bytes + 2 * operand_bytes
    )  # read grad_out, input, kernel; write both grads
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[
        pass_name
    ]


def benchmark_op(
    shape: OpShape,
    kernel_size: int = 7,
    stride: int = 1,
    group_channels: int = 16,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    backends: Sequence[str] | None = None,
    baselines: Sequence[str] = ("depthwise",),
    passes: Sequence[str] = PASSES,
    warmup: int = 2,
    repeats: int = 10,
    copy_bytes: int | None = None,
    channels_last: bool = False,
) -> list[dict[str, Any]]:
    """Measures each involution backend and baseline convolution at one shape.

    Args:
        shape: the input shape.
        kernel_size: K (odd).
        stride: of the involution and of the convolutions.
        group_channels: channels per involution group; groups = channels // group_channels.
        dtype: of every tensor.
        device: where to run.
        backends: involution backends; ``None`` means every backend available on ``device``.
        baselines: a subset of ``BASELINES``.
        passes: a subset of ``PASSES``.
        warmup, repeats: as in :func:`involution.benchmark.measure_time`.
        copy_bytes: size of the tensor copy timed right after each pass (see
            :func:`copy_bandwidth`); when given, each row also has that copy's bandwidth, the
            floor time of the pass and the fraction of it reached.
        channels_last: channels-last inputs and pixel-major involution kernels instead of
            contiguous (NCHW) tensors.

    Returns:
        One row per candidate and pass: ``shape``, ``op``, ``pass``, ``median_ms``, ``min_ms``,
        ``peak_mib`` (peak memory above what was live before the pass), ``peak_vs_operands``
        (that peak over the bytes of the input and the kernel or weight), ``moved_mb`` (bytes
        that must move, 1e6), ``gb_per_s`` (those bytes over the median time, 1e9),
        ``copy_gb_per_s`` (the copy's bandwidth, 1e9), ``floor_ms`` and ``floor_fraction``
        (floor time over median time; these three ``None`` without ``copy_bytes``),
        ``vs_reference`` (reference time over this time; ``None`` when the reference backend
        is not measured).

    Raises:
        ValueError: a bad shape, kernel_size, group_channels, pass, baseline, backend or
            copy_bytes.
        RuntimeError: a named backend cannot run on ``device``; the message says why.
    """
    device = torch.device(device)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size ({kernel_size}) must be a positive odd int")
    if stride < 1:
        raise ValueError(f"stride ({stride}) must be >= 1")
    if group_channels < 1 or shape.channels % group_channels != 0:
        raise ValueError(
            f"group_channels ({group_channels}) must divide the channels of shape {shape}"
        )
    for name, values, allowed in (
        ("passes", passes, PASSES),
        ("baselines", baselines, BASELINES),
        ("backends", backends or (), BACKENDS),
    ):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise ValueError(f"{name} ({unknown}) must be among {allowed}")
    if backends is None:
        backends = available_backends(device, dtype)
    else:  # checked before any measurement: a refusal halfway would discard the rows before it
        for name in backends:
            why = _why_not(name, device, dtype)
            if why is not None:
                raise RuntimeError(f"backends ({name!r}) cannot run on {device} in {dtype}: {why}")
    copy = None if copy_bytes is None else _copy_operands(device, copy_bytes, "copy_bytes")
    candidates = _candidates(
        shape,
        kernel_size,
        stride,
        group_channels,
        dtype,
        device,
        backends,
        baselines,
        channels_last,
    )
    rows: list[dict[str, Any]] = []
    for candidate in candidates:
        operand_bytes = sum(t.nbytes for t in candidate.operands)
        for pass_name in passes:
            logger.info("measuring %s %s at %s", candidate.name, pass_name, shape)
            fn = _pass_fn(candidate, pass_name)
            timing = measure_time(fn, device, max(warmup, 1), repeats)
            bandwidth = None if copy is None else _copy_rate(*copy, max(warmup, 1), repeats)
            peak = peak_memory(fn, device)
            moved = _bytes_moved(candidate, pass_name)
            floor = None if bandwidth is None else moved / bandwidth
            rows.append(
                {
                    "shape": str(shape),
                    "op": candidate.name,
                    "pass": pass_name,
                    "median_ms": timing.median * 1e3,
                    "min_ms": timing.minimum * 1e3,
                    "peak_mib": peak / _MiB,
                    "peak_vs_operands": peak / operand_bytes,
                    "moved_mb": moved / 1e6,
                    "gb_per_s": moved / timing.median / 1e9,
                    "copy_gb_per_s": None if bandwidth is None else bandwidth / 1e9,
                    "floor_ms": None if floor is None else floor * 1e3,
                    "floor_fraction": None if floor is None else floor / timing.median,
                    "vs_reference": None,
                }
            )
            del fn
    reference = {r["pass"]: r["median_ms"] for r in rows if r["op"] == "involution[reference]"}
    for row in rows:
        if row["pass"] in reference:
            row["vs_reference"] = reference[row["pass"]] / row["median_ms"]
    return rows

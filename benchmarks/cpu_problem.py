"""The problem the CPU pass benchmarks time: one involution at one shape, on random operands.

Shared by ``bench_cpu_passes.py`` and ``bench_cpu_candidates.py``: their command-line options
for the shape, and the cpu backend's three passes on the operands (stride 1, dilation 1,
padding k // 2; channels_last inputs with a pixel-major kernel, or NCHW with a contiguous one).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

from involution.ops import layout
from involution.ops.cpu import launch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the problem and the threads."""
    parser.add_argument("--shape", default="8x256x56x56", help="BxCxHxW (default: %(default)s)")
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--group-channels", type=int, default=16)
    parser.add_argument("--nchw", action="store_true", help="NCHW inputs (default: channels_last)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())


@dataclass
class Problem:
    x: torch.Tensor
    kernel: torch.Tensor
    grad_out: torch.Tensor
    kernel_size: int
    groups: int
    passes: dict[str, Callable[[], torch.Tensor]]  # the cpu backend's, by name

    def describe(self, args: argparse.Namespace) -> str:
        layout_name = "NCHW" if args.nchw else "channels_last"
        return (
            f"{args.shape}, K={self.kernel_size}, G={self.groups}, {layout_name}, "
            f"{args.threads} threads, float32"
        )


def problem(args: argparse.Namespace) -> Problem:
    """Random float32 operands for ``args`` and the cpu backend's passes on them."""
    batch, channels, height, width = (int(v) for v in args.shape.split("x"))
    k, groups = args.kernel_size, channels // args.group_channels
    fmt = torch.contiguous_format if args.nchw else torch.channels_last
    geometry = ((k, k), (1, 1), (k // 2, k // 2), (1, 1))
    torch.manual_seed(0)
    x = torch.randn(batch, channels, height, width).contiguous(memory_format=fmt)
    shape = (batch, groups, k * k, height, width)
    kernel = layout.empty_kernel(shape, x, pixel_major=not args.nchw).normal_()
    grad_out = torch.randn_like(x)
    passes = {
        "forward": lambda: launch.forward(x, kernel, *geometry),
        "grad_input": lambda: launch.grad_input(grad_out, kernel, (height, width), *geometry),
        "grad_kernel": lambda: launch.grad_kernel(grad_out, x, *geometry, groups),
    }
    return Problem(x, kernel, grad_out, k, groups, passes)

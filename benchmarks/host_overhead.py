"""Host time per call of the involution op's Python layers, without the kernels' own work.

A backend named ``null`` is registered for the run: its passes only allocate their results, so
what is timed is the library's own cost per call (argument checks, backend choice, the
``torch.library`` custom ops, autograd and the layout handling) plus one allocation per result.
That cost is paid on the host before any GPU kernel can start, and it is the floor of small
layers. The ``torch.empty`` row is the null passes' own allocation, for scale.

Usage:
    PYTHONPATH=src python benchmarks/host_overhead.py [--repeats 2000]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import types
from collections.abc import Callable

import torch

from involution import functional
from involution.benchmark.report import environment, format_rows
from involution.ops import _library, dispatch, layout


def _null_backend() -> types.ModuleType:
    module = types.ModuleType("null")

    def forward(input, kernel, kernel_size, stride, padding, dilation):
        shape = (*input.shape[:2], *kernel.shape[3:])
        return layout.empty(shape, input)

    def grad_input(grad_out, kernel, input_size, kernel_size, stride, padding, dilation):
        shape = (*grad_out.shape[:2], *input_size)
        return layout.empty(shape, grad_out)

    def grad_kernel(grad_out, input, kernel_size, stride, padding, dilation, groups):
        shape = (input.shape[0], groups, math.prod(kernel_size), *grad_out.shape[2:])
        return layout.empty_kernel(shape, input, layout.channels_last(input))

    module.forward, module.grad_input, module.grad_kernel = forward, grad_input, grad_kernel
    return module


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(max(repeats // 10, 10)):
        fn()
    seconds = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - begin)
    return statistics.median(seconds) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2000, help="timed calls per row")
    args = parser.parse_args()

    dispatch._IMPLEMENTATIONS["null"] = _null_backend()
    dispatch._CAN_RUN["null"] = dispatch.can_run_torch
    torch.set_num_threads(1)

    x = torch.randn(2, 16, 6, 6)
    kernel = torch.randn(2, 1, 9, 6, 6)
    features = torch.randn(2, 4, 6, 6)
    weight, bias = torch.randn(9, 4), torch.randn(9)
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1])
    xr, kr, fr, wr, br = (t.clone().requires_grad_() for t in (x, kernel, features, weight, bias))

    def backward(out: torch.Tensor) -> None:
        out.backward(torch.ones_like(out))

    rows = [
        ("torch.empty (one result)", "forward", lambda: torch.empty(2, 16, 6, 6)),
        (
            "custom op involution::involution",
            "forward",
            lambda: _library.involution(x, kernel, *geometry, "null"),
        ),
        ("involution2d", "forward", lambda: functional.involution2d(x, kernel, 3, backend="null")),
        (
            "involution2d",
            "forward+backward",
            lambda: backward(functional.involution2d(xr, kr, 3, backend="null")),
        ),
        (
            "fused_involution2d",
            "forward",
            lambda: functional.fused_involution2d(x, features, weight, bias, 3, backend="null"),
        ),
        (
            "fused_involution2d",
            "forward+backward",
            lambda: backward(functional.fused_involution2d(xr, fr, wr, br, 3, backend="null")),
        ),
    ]
    metadata = {
        **environment("cpu"),
        "torch_threads": 1,
        "command": f"PYTHONPATH=src python benchmarks/host_overhead.py --repeats {args.repeats}",
    }
    table = [
        {"call": name, "pass": kind, "median_us": round(_median_us(fn, args.repeats), 1)}
        for name, kind, fn in rows
    ]
    print(format_rows(table, "table", metadata))


if __name__ == "__main__":
    main()

"""The cpu backend's fused op against the composition it replaces, at RedNet's layer shapes.

Composed: the span (a 1x1 convolution, oneDNN) writes the (B, G * K^2, *out) kernel map, the cpu
backend's involution reads it, and the backward writes the kernel's gradient and takes it back
through the span (two more products over the map). Fused: ``fused_involution2d`` with the cpu
backend's native passes, which generate the kernel inside the kernels and never store it.

Each repeat times both, one after the other, so that the ratio of a repeat compares the two
under the same load; the table gives the medians of the times and of the per-repeat ratios,
after warm-up.

Usage:
    PYTHONPATH=src python benchmarks/bench_fused_cpu.py [--repeats 15] [--channels-last]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from involution import functional
from involution.ops import span

# (name, batch, channels, hidden R, groups, size, stride): the distinct 7x7 layers of the demo's
# rednet26_cifar (batch 32, base width 16) and RedNet-50's first two stages at batch 8.
SHAPES = [
    ("demo 16ch 32x32", 32, 16, 4, 1, 32, 1),
    ("demo 32ch 32x32 s2", 32, 32, 8, 2, 32, 2),
    ("demo 32ch 16x16", 32, 32, 8, 2, 16, 1),
    ("demo 64ch 8x8", 32, 64, 16, 4, 8, 1),
    ("rednet50 64ch 56x56", 8, 64, 16, 4, 56, 1),
    ("rednet50 128ch 28x28", 8, 128, 32, 8, 28, 1),
]
KERNEL = 7


def _inputs(batch, channels, hidden, groups, size, stride, channels_last):
    out = (size + 2 * (KERNEL // 2) - KERNEL) // stride + 1
    x = torch.randn(batch, channels, size, size)
    f = torch.randn(batch, hidden, out, out)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        f = f.contiguous(memory_format=torch.channels_last)
    w = torch.randn(groups * KERNEL * KERNEL, hidden) / hidden**0.5
    b = torch.randn(groups * KERNEL * KERNEL)
    return [t.requires_grad_() for t in (x, f, w, b)]


def _composed(x, f, w, b, stride):
    kernel = span.span(f, w, b, KERNEL * KERNEL)
    return functional.involution2d(x, kernel, KERNEL, stride, backend="cpu")


def _fused(x, f, w, b, stride):
    return functional.fused_involution2d(x, f, w, b, KERNEL, stride, backend="cpu")


def _timer(fn: Callable, args, stride: int, backward: bool) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        out = fn(*args, stride)
        if backward:
            torch.autograd.grad(out, args, torch.ones_like(out))
        return (time.perf_counter() - start) * 1e3

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repeats (default 3)")
    parser.add_argument("--channels-last", action="store_true", help="input and features")
    args = parser.parse_args()
    torch.manual_seed(0)
    layout = "channels_last" if args.channels_last else "NCHW"
    print(f"threads: {torch.get_num_threads()}  layout: {layout}  float32  K={KERNEL}")
    header = (
        f"{'shape':<22} {'pass':<17} {'composed_ms':>11} {'fused_ms':>9} {'fused/composed':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, batch, channels, hidden, groups, size, stride in SHAPES:
        tensors = _inputs(batch, channels, hidden, groups, size, stride, args.channels_last)
        for backward in (False, True):
            timers = [_timer(fn, tensors, stride, backward) for fn in (_composed, _fused)]
            for _ in range(args.warmup):
                for timer in timers:
                    timer()
            pairs = [[timer() for timer in timers] for _ in range(args.repeats)]
            composed = statistics.median(p[0] for p in pairs)
            fused = statistics.median(p[1] for p in pairs)
            ratio = statistics.median(p[1] / p[0] for p in pairs)
            label = "forward+backward" if backward else "forward"
            print(f"{name:<22} {label:<17} {composed:>11.2f} {fused:>9.2f} {ratio:>14.2f}")


if __name__ == "__main__":
    main()

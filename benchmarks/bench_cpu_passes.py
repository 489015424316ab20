"""The cpu backend's passes with large results on huge pages and on 4 KiB pages, alternating.

Times ``forward``, ``grad_input`` and ``grad_kernel`` of the cpu backend (``ops/cpu/launch.py``)
on random inputs at one shape, in rounds that alternate between results backed by huge pages
(what the backend does from ``_HUGE_RESULT_BYTES`` on) and results left on 4 KiB pages, in one
process, so that a machine whose speed drifts slows both alike. Each pass runs twice in a row
and the second call is timed, freeing its result included: the steady state of a training
loop, where every step allocates the same results. (The first huge-page call after the other
variant's calls was up to 2.5x slower than the next one; the cause was not found. A loop that
alternates torch's own large allocations with the advised pass does not show it:
BENCHMARKS.md.) Prints the median time of each pass and variant, and their ratio; the results of
the two variants are compared for equality.

Usage:
    PYTHONPATH=src python benchmarks/bench_cpu_passes.py [--shape 8x256x56x56] [--nchw]
        [--threads 2] [--rounds 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from involution.ops.cpu import launch


def _variants() -> dict[str, Callable[[], None]]:
    """Name -> a function that makes the backend run that variant."""
    size = launch._HUGE_RESULT_BYTES
    return {
        "huge pages": lambda: setattr(launch, "_HUGE_RESULT_BYTES", size),
        "4 KiB pages": lambda: setattr(launch, "_HUGE_RESULT_BYTES", 1 << 62),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8x256x56x56", help="BxCxHxW (default: %(default)s)")
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--group-channels", type=int, default=16)
    parser.add_argument("--nchw", action="store_true", help="NCHW inputs (default: channels_last)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=8, help="alternations (default: 8)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    batch, channels, height, width = (int(v) for v in args.shape.split("x"))
    k, groups = args.kernel_size, channels // args.group_channels
    fmt = torch.contiguous_format if args.nchw else torch.channels_last
    geometry = ((k, k), (1, 1), (k // 2, k // 2), (1, 1))
    torch.manual_seed(0)
    x = torch.randn(batch, channels, height, width).contiguous(memory_format=fmt)
    kernel = torch.randn(batch, groups * k * k, height, width).contiguous(memory_format=fmt)
    kernel = kernel.view(batch, groups, k * k, height, width)
    grad_out = torch.randn_like(x)
    passes = {
        "forward": lambda: launch.forward(x, kernel, *geometry),
        "grad_input": lambda: launch.grad_input(grad_out, kernel, (height, width), *geometry),
        "grad_kernel": lambda: launch.grad_kernel(grad_out, x, *geometry, groups),
    }
    variants = _variants()
    names = list(variants)
    times: dict[tuple[str, str], list[float]] = {(v, p): [] for v in names for p in passes}
    results: dict[tuple[str, str], torch.Tensor] = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name in names if round_ % 2 == 0 else names[::-1]:
            variants[name]()
            for p, fn in passes.items():
                results[name, p] = fn()  # settles the allocator after the other variant
                start = time.perf_counter()
                fn()
                if round_:
                    times[name, p].append(time.perf_counter() - start)

    layout = "NCHW" if args.nchw else "channels_last"
    print(f"{args.shape}, K={k}, G={groups}, {layout}, {args.threads} threads, float32")
    print(f"median ms of {args.rounds} alternating rounds")
    print(f"{'pass':12s} {names[0]:>14s} {names[1]:>14s} {'ratio':>7s}")
    total = [0.0, 0.0]
    for p in passes:
        a, b = (statistics.median(times[v, p]) * 1e3 for v in names)
        total[0] += a
        total[1] += b
        same = "" if torch.equal(results[names[0], p], results[names[1], p]) else "  (differ)"
        print(f"{p:12s} {a:14.1f} {b:14.1f} {b / a:7.2f}{same}")
    print(f"{'sum':12s} {total[0]:14.1f} {total[1]:14.1f} {total[1] / total[0]:7.2f}")


if __name__ == "__main__":
    main()

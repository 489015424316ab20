"""The cpu backend's passes with their large results' memory three ways, alternating.

Times ``forward``, ``grad_input`` and ``grad_kernel`` of the cpu backend (``ops/cpu/launch.py``)
on random inputs at one shape, in rounds that alternate, in one process (so that a machine whose
speed drifts slows all alike), between the ways ``ops/cpu/results.py`` can give a large result
memory:

* ``fresh``: a mapping of its own, advised huge pages (what the backend does from
  ``results.LARGE_BYTES`` on);
* ``kept``: the same inside ``results.keep()``, where a freed result's mapping is reused (what
  a training run does);
* ``4 KiB pages``: PyTorch's allocator (glibc maps such a block afresh, on 4 KiB pages).

Each pass runs twice in a row and the second call is timed, freeing its result included: the
steady state of a training loop, where every step allocates the same results. (The first
huge-page call after the other variants' calls was up to 2.5x slower than the next one; the
cause was not found: BENCHMARKS.md.) Prints the median time of each pass and variant, and the
ratios to ``fresh``; the results of the variants are compared for equality.

Usage:
    PYTHONPATH=src python benchmarks/bench_cpu_passes.py [--shape 8x256x56x56] [--nchw]
        [--threads 2] [--rounds 8]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch

import cpu_problem
from involution.ops.cpu import results


@contextlib.contextmanager
def _small_pages() -> Iterator[None]:
    size = results.LARGE_BYTES
    results.LARGE_BYTES = 1 << 62
    try:
        yield
    finally:
        results.LARGE_BYTES = size


# Name -> a block inside which the backend runs that variant.
_VARIANTS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "fresh": contextlib.nullcontext,
    "kept": results.keep,
    "4 KiB pages": _small_pages,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cpu_problem.add_arguments(parser)
    parser.add_argument("--rounds", type=int, default=8, help="alternations (default: 8)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    problem = cpu_problem.problem(args)
    passes = problem.passes
    names = list(_VARIANTS)
    times: dict[tuple[str, str], list[float]] = {(v, p): [] for v in names for p in passes}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name in names if round_ % 2 == 0 else names[::-1]:
            with _VARIANTS[name]():
                for p, fn in passes.items():
                    fn()  # settles the allocator after the other variants
                    start = time.perf_counter()
                    fn()
                    if round_:
                        times[name, p].append(time.perf_counter() - start)
    outputs = {}
    for name in names:
        with _VARIANTS[name]():
            outputs.update({(name, p): fn() for p, fn in passes.items()})

    print(problem.describe(args))
    print(f"median ms of {args.rounds} alternating rounds")
    others = names[1:]

    def row(ms: dict[str, float]) -> str:
        """Each variant's ms, then each other variant's ratio to the first."""
        cells = [f"{ms[v]:13.1f}" for v in names]
        return "".join(cells + [f"{ms[v] / ms[names[0]]:22.2f}" for v in others])

    header = [f"{v:>13s}" for v in names] + [f"{v + ' / ' + names[0]:>22s}" for v in others]
    print(f"{'pass':12s}{''.join(header)}")
    total = dict.fromkeys(names, 0.0)
    for p in passes:
        ms = {v: statistics.median(times[v, p]) * 1e3 for v in names}
        for v in names:
            total[v] += ms[v]
        same = all(torch.equal(outputs[names[0], p], outputs[v, p]) for v in others)
        print(f"{p:12s}{row(ms)}{'' if same else '  (differ)'}")
    print(f"{'sum':12s}{row(total)}")


if __name__ == "__main__":
    main()

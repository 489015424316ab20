"""The other ways to build the cpu backend, measured against it: inductor and a torch extension.

Issue 12 named three ways to get CPU kernels for involution: (a) a C++ extension built against
torch's headers (ATen's vectorized types, ``at::parallel_for``), (b) kernels that
``torch.compile`` (inductor) generates from one fused expression per pass, (c) something better.
The backend is (c): its own C++ (``ops/cpu/kernels.cpp``), compiled on first use without torch's
headers and called through ctypes. This script measures what decides between them, on the
machine it runs on, at one shape:

* (b) Forward, grad_input and grad_kernel, each written as one expression: forward and
  grad_input as the sum of the K*K products of shifted slices (grad_input gathers grad_out and
  the kernel at the output pixels that reach each input pixel), grad_kernel as a sum over each
  group's channels of the unfolded input times grad_out, its result in the backend's kernel
  layout. Each is compiled by ``torch.compile`` into an empty cache (the first-use cost), checked
  against the cpu backend, then timed against the backend's pass in alternating rounds.
* (a) The time to build and load a one-function extension that includes torch's headers, into
  an empty folder: what (a) adds to a first use. Its kernels would be the backend's C++ code, so
  their speed is not what tells (a) from (c).
* (c) The backend's own first use: building and loading all its float32 passes (the library a
  float32 model loads), into an empty cache.

Both candidates' large results stay mapped between calls (the backend's inside
``results.keep()``; torch's allocator with glibc's mmap and trimming off, where the allocator is
glibc's), so that no timed call pays for page faults. Stride 1, dilation 1, "same" padding.

Usage:
    PYTHONPATH=src python benchmarks/bench_cpu_candidates.py [--shape 8x256x56x56] [--nchw]
        [--threads 2] [--rounds 5] [--no-extension]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import cpu_problem
from involution.ops.cpu import build, results
from involution.training import memory

# glibc's mallopt parameter: the most blocks it maps on their own (0: none, all from the heap).
_M_MMAP_MAX = -4


def _glibc_heap_only() -> bool:
    """Serves every block from glibc's heap (whose trimming keep_freed_memory turns off), where
    the process's allocator is glibc's."""
    libc = memory._glibc()
    return libc is not None and libc.mallopt(_M_MMAP_MAX, 0) == 1


def _inductor_passes(
    k: int, groups: int
) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """The three passes as one expression each (stride 1, dilation 1, padding k // 2)."""
    p, taps = k // 2, k * k

    def forward(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        xp = F.pad(x, (p, p, p, p)).view(b, groups, c // groups, h + 2 * p, w + 2 * p)
        out = sum(
            xp[..., t // k : t // k + h, t % k : t % k + w] * kernel[:, :, t : t + 1]
            for t in range(taps)
        )
        return out.view(b, c, h, w)

    def grad_input(grad_out: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        b, c, h, w = grad_out.shape
        gp = F.pad(grad_out, (p, p, p, p)).view(b, groups, c // groups, h + 2 * p, w + 2 * p)
        kp = F.pad(kernel, (p, p, p, p))
        # Input pixel i is reached by tap t of output pixel i + p - (kh, kw).
        out = sum(
            gp[..., 2 * p - t // k :, 2 * p - t % k :][..., :h, :w]
            * kp[:, :, t : t + 1, 2 * p - t // k :, 2 * p - t % k :][..., :h, :w]
            for t in range(taps)
        )
        return out.view(b, c, h, w)

    def grad_kernel(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        unfolded = F.unfold(x, k, padding=p).view(b, groups, c // groups, taps, h * w)
        out = (unfolded * grad_out.reshape(b, groups, c // groups, 1, h * w)).sum(2)
        out = out.view(b, groups, taps, h, w)
        if x.is_contiguous():
            return out
        return out.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)  # pixel-major

    return {"forward": forward, "grad_input": grad_input, "grad_kernel": grad_kernel}


def _backend_build_seconds() -> float:
    """Build and load time of the cpu backend's float32 library, into an empty cache."""
    previous = os.environ.get("XDG_CACHE_HOME")
    with tempfile.TemporaryDirectory() as folder:
        os.environ["XDG_CACHE_HOME"] = folder
        try:
            start = time.perf_counter()
            try:
                build.library("float32")
            except build.BuildError as error:
                raise SystemExit(f"the cpu backend cannot be built here: {error}") from error
            return time.perf_counter() - start
        finally:
            if previous is None:
                del os.environ["XDG_CACHE_HOME"]
            else:
                os.environ["XDG_CACHE_HOME"] = previous


def _extension_seconds() -> str:
    """Build and load time of a minimal extension with torch's headers, or why not measured."""
    from torch.utils import cpp_extension

    source = (
        "#include <torch/extension.h>\ntorch::Tensor twice(torch::Tensor x) { return x * 2; }\n"
    )
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        try:
            module = cpp_extension.load_inline(
                "involution_candidate_a",
                cpp_sources=source,
                functions=["twice"],
                build_directory=folder,
                extra_cflags=["-O3", "-march=native"],
            )
        except (RuntimeError, OSError) as error:
            return f"not measured ({str(error).splitlines()[0]})"
        seconds = time.perf_counter() - start
        x = torch.randn(8)
        if not torch.equal(module.twice(x), x * 2):
            raise SystemExit("the extension's result is wrong")
    return f"{seconds:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cpu_problem.add_arguments(parser)
    parser.add_argument("--rounds", type=int, default=5, help="alternations (default: 5)")
    parser.add_argument(
        "--no-extension", action="store_true", help="skip building the extension of (a)"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    backend_build = _backend_build_seconds()  # first, before any pass loads the library
    problem = cpu_problem.problem(args)
    x, kernel, grad_out, cpu = problem.x, problem.kernel, problem.grad_out, problem.passes
    operands = {
        "forward": (x, kernel),
        "grad_input": (grad_out, kernel),
        "grad_kernel": (grad_out, x),
    }

    # An empty cache, so that the first call of each pass is a first use.
    cache = tempfile.TemporaryDirectory()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    inductor: dict[str, Callable[[], torch.Tensor]] = {}
    compile_seconds = {}
    for name, fn in _inductor_passes(problem.kernel_size, problem.groups).items():
        compiled = torch.compile(fn, dynamic=False)
        start = time.perf_counter()
        with torch.no_grad():
            got = compiled(*operands[name])
        compile_seconds[name] = time.perf_counter() - start
        expected = cpu[name]()
        if got.stride() != expected.stride() or not torch.allclose(
            got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())
        ):
            raise SystemExit(f"inductor's {name} differs from the cpu backend's")
        inductor[name] = lambda fn=compiled, a=operands[name]: fn(*a)

    candidates = {"cpu": cpu, "inductor": inductor}
    times: dict[tuple[str, str], list[float]] = {(c, p): [] for c in candidates for p in cpu}
    heap_only = _glibc_heap_only()
    with memory.keep_freed_memory(torch.device("cpu")), results.keep(), torch.no_grad():
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for name in list(candidates) if round_ % 2 == 0 else list(candidates)[::-1]:
                for p, fn in candidates[name].items():
                    fn()  # the steady state: the result of the call before is freed
                    start = time.perf_counter()
                    fn()
                    if round_:
                        times[name, p].append(time.perf_counter() - start)
    cache.cleanup()

    allocation = "glibc heap only, kept" if heap_only else "torch's allocator as it is"
    print(f"{problem.describe(args)}; inductor's results: {allocation}")
    print(f"median ms of {args.rounds} alternating rounds; compile: first call, empty cache")
    print(f"{'pass':12s}{'cpu':>10s}{'inductor':>10s}{'inductor / cpu':>16s}{'compile s':>11s}")
    total = {"cpu": 0.0, "inductor": 0.0}
    for p in cpu:
        ms = {c: statistics.median(times[c, p]) * 1e3 for c in candidates}
        for c in candidates:
            total[c] += ms[c]
        print(
            f"{p:12s}{ms['cpu']:10.2f}{ms['inductor']:10.2f}"
            f"{ms['inductor'] / ms['cpu']:16.2f}{compile_seconds[p]:11.1f}"
        )
    print(
        f"{'sum':12s}{total['cpu']:10.2f}{total['inductor']:10.2f}"
        f"{total['inductor'] / total['cpu']:16.2f}{sum(compile_seconds.values()):11.1f}"
    )
    print("first use, empty caches:")
    print(f"  (c) the cpu backend, every pass in float32: {backend_build:.1f} s")
    print(f"  (b) inductor, the three float32 passes above: {sum(compile_seconds.values()):.1f} s")
    if not args.no_extension:
        print(f"  (a) a one-function extension with torch's headers: {_extension_seconds()}")


if __name__ == "__main__":
    main()

"""The cpu backend's kernels from two sources, alternating in one process: is a change faster?

Builds ``src/involution/ops/cpu/kernels.cpp`` as it is in the working tree and as it was at a
git revision (``--baseline``, default ``HEAD``; or a source file, for a copy of the project
without its history), loads both, and times the same work with each in turn, round after round,
so that a machine whose speed drifts slows both alike. ``--flags`` adds compiler flags to the new
side's build (the same source against itself then compares a flag). Prints each side's median
and the ratio new / baseline. One of three kinds of work:

* ``passes`` (default): forward, grad_input and grad_kernel at one shape (``cpu_problem.py``),
  one after the other as in a training step, then forward and backward through autograd;
  each result is compared with the baseline's (largest difference printed);
* ``fused``: the fused op's forward and backward at one layer of the demo's RedNet-26 (16
  channels per group, ``--hidden`` features, batch and size from ``--shape``);
* ``step``: one training step of the demo's ``rednet26_cifar`` (base width 16, batch 32,
  1x32x32, channels_last), with ``resnet26_cifar``'s step timed beside it for the ratio the issue
  names.

Freed result memory is kept (``results.keep``) throughout, as in training.

Usage:
    PYTHONPATH=src python benchmarks/bench_cpu_ab.py [--baseline REV|FILE] [--flags=-FLAG ...]
        [--work passes] [--shape 8x256x56x56] [--nchw] [--threads 2] [--rounds 15]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import cpu_problem
from involution import create_model, functional
from involution.ops.cpu import build, launch, results
from profile_rednet_cpu import demo_optimizer, train_step

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "src/involution/ops/cpu/kernels.cpp"


def _library(source: bytes, folder: Path, flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The float32 kernels built from ``source`` with ``flags`` added (through the build's cache,
    like a first use)."""
    path = folder / f"kernels-{len(list(folder.iterdir()))}.cpp"
    path.write_bytes(source)
    flags = (*build.FLAGS, *flags, build.storage_flag("float32"), *build.OPENMP)
    return build._built(build._compiler(), flags, path, "float32")


def _baseline_source(baseline: str) -> bytes:
    """kernels.cpp at git revision ``baseline``, or the file ``baseline`` names."""
    if Path(baseline).is_file():
        return Path(baseline).read_bytes()
    shown = subprocess.run(["git", "show", f"{baseline}:{SOURCE}"], cwd=ROOT, capture_output=True)
    if shown.returncode:
        raise SystemExit(
            f"--baseline {baseline!r}: neither a file nor a git revision with {SOURCE} "
            f"({shown.stderr.decode(errors='replace').strip()})"
        )
    return shown.stdout


def _passes(args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    problem = cpu_problem.problem(args)
    x = problem.x.detach().requires_grad_()
    kernel = problem.kernel.detach().requires_grad_()
    k = problem.kernel_size

    def forward_backward() -> object:
        out = functional.involution2d(x, kernel, kernel_size=k, padding=k // 2, backend="cpu")
        return torch.autograd.grad(out, (x, kernel), problem.grad_out)

    return {**problem.passes, "forward+backward": forward_backward}


def _fused(args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    batch, channels, height, width = (int(v) for v in args.shape.split("x"))
    k, groups = args.kernel_size, channels // args.group_channels
    fmt = torch.contiguous_format if args.nchw else torch.channels_last
    torch.manual_seed(0)
    x = torch.randn(batch, channels, height, width).contiguous(memory_format=fmt)
    features = torch.randn(batch, args.hidden, height, width).contiguous(memory_format=fmt)
    weight = torch.randn(groups * k * k, args.hidden) / args.hidden**0.5
    bias = torch.randn(groups * k * k)
    grad_out = torch.randn_like(x)
    geometry = ((k, k), (1, 1), (k // 2, k // 2), (1, 1))
    return {
        "fused_forward": lambda: launch.fused_forward(x, features, weight, bias, *geometry),
        "fused_backward": lambda: launch.fused_backward(
            grad_out, x, features, weight, bias, *geometry
        ),
    }


def _step(name: str) -> Callable[[], object]:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1, base_width=16)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = demo_optimizer(model)
    x = torch.randn(32, 1, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,))
    return lambda: train_step(model, opt, x, y)


def _seconds(fn: Callable[[], object], repeats: int) -> float:
    """The time of one call of ``fn``, over ``repeats`` calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _largest_difference(a: object, b: object) -> float:
    pairs = zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]
    return max((u.float() - v.float()).abs().max().item() for u, v in pairs)  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cpu_problem.add_arguments(parser)
    parser.add_argument(
        "--baseline", default="HEAD", help="git revision or kernels.cpp file (default: HEAD)"
    )
    parser.add_argument(
        "--flags",
        default="",
        help="compiler flags added to the new side's build, e.g. --flags=-mprefer-vector-width=512",
    )
    parser.add_argument("--work", choices=["passes", "fused", "step"], default="passes")
    parser.add_argument("--hidden", type=int, default=16, help="fused: span features")
    parser.add_argument("--rounds", type=int, default=15, help="alternations (default: 15)")
    args = parser.parse_args()
    if args.work == "fused" and args.shape == parser.get_default("shape"):
        args.shape = "32x64x16x16"
    torch.set_num_threads(args.threads)

    baseline = _baseline_source(args.baseline)
    with tempfile.TemporaryDirectory() as folder:
        libraries = {
            args.baseline: _library(baseline, Path(folder)),
            "new": _library((ROOT / SOURCE).read_bytes(), Path(folder), tuple(args.flags.split())),
        }
    sides = list(libraries)
    work = {"passes": _passes, "fused": _fused}.get(args.work)
    tasks = work(args) if work else {"rednet26_cifar step": _step("rednet26_cifar")}
    beside = {"resnet26_cifar step": _step("resnet26_cifar")} if args.work == "step" else {}
    repeats = 10 if args.work == "step" else 1

    times: dict[tuple[str, str], list[float]] = {(s, t): [] for s in sides for t in tasks}
    times.update({("-", t): [] for t in beside})
    outputs: dict[tuple[str, str], object] = {}
    with results.keep():
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for side in sides if round_ % 2 == 0 else sides[::-1]:
                build._loaded["float32"] = libraries[side]  # what launch.py's passes call
                for name, fn in tasks.items():
                    outputs[side, name] = fn()
                    seconds = _seconds(fn, repeats)
                    if round_:
                        times[side, name].append(seconds)
            for name, fn in beside.items():
                fn()
                seconds = _seconds(fn, repeats)
                if round_:
                    times["-", name].append(seconds)

    flags = f" built with {args.flags}" if args.flags else ""
    print(f"kernels.cpp: working tree{flags} (new) against {args.baseline}; {args.work}, ", end="")
    print(f"{args.shape if args.work != 'step' else 'demo settings'}, {args.threads} threads")
    print(f"median ms of {args.rounds} alternating rounds")
    print(f"{'work':22s}{args.baseline[:12]:>13s}{'new':>10s}{'new / base':>12s}  difference")
    for name in tasks:
        base, new = (statistics.median(times[s, name]) * 1e3 for s in sides)
        diff = (
            ""
            if args.work == "step"
            else f"  {_largest_difference(*(outputs[s, name] for s in sides)):.3g}"
        )
        print(f"{name:22s}{base:13.2f}{new:10.2f}{new / base:12.3f}{diff}")
    for name in beside:
        ms = statistics.median(times["-", name]) * 1e3
        print(f"{name:22s}{ms:13.2f}  (rednet / resnet: ", end="")
        print(
            ", ".join(
                f"{s[:12]} {statistics.median(times[s, 'rednet26_cifar step']) * 1e3 / ms:.3f}"
                for s in sides
            )
            + ")"
        )


if __name__ == "__main__":
    main()

"""GPU benchmark of the involution backends at RedNet-50's layer shapes (needs CUDA and Triton).

For each involution layer of RedNet-50 (batch 64 by default) and each dtype, prints:

1. the relative error of the triton backend against the reference (forward and both
   gradients; the reference runs in float64), before anything is timed;
2. forward, backward and forward+backward median times (``triton.testing.do_bench``) and peak
   memory above the inputs for: the reference, the torch backend, ``torch.compile`` of the
   reference, triton, and a cuDNN depthwise convolution of the same kernel size as a yardstick;
3. the autotuner's time for each strip length of the triton kernels (``ops/triton/kernels.py``);
4. triton's achieved bandwidth against a measured device-to-device copy. Bytes counted: forward
   reads input and kernel once and writes the output once; backward reads grad_out, input and
   kernel once and writes both gradients once. A copy moves 2 bytes per byte copied.

Usage:
    PYTHONPATH=src python benchmarks/bench_gpu.py [--batch 64] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch._functorch.config
import torch.nn.functional as F
import triton.testing

from involution.benchmark.memory import peak_memory
from involution.benchmark.op import copy_bandwidth
from involution.functional import involution2d, output_size
from involution.ops.triton import launch


@dataclass(frozen=True)
class Layer:
    name: str
    channels: int
    size: int
    kernel_size: int
    stride: int
    group_channels: int = 16

    @property
    def groups(self) -> int:
        return self.channels // self.group_channels


# RedNet-50: the stem's 3x3 involution, then the 7x7 involution of each stage (stride 2 in the
# first block of stages 2-4, applied to the stage's input resolution).
LAYERS = [
    Layer("stem 32@112 k3", 32, 112, 3, 1),
    Layer("s1 64@56", 64, 56, 7, 1),
    Layer("s2 128@56 /2", 128, 56, 7, 2),
    Layer("s2 128@28", 128, 28, 7, 1),
    Layer("s3 256@28 /2", 256, 28, 7, 2),
    Layer("s3 256@14", 256, 14, 7, 1),
    Layer("s4 512@14 /2", 512, 14, 7, 2),
    Layer("s4 512@7", 512, 7, 7, 1),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("fwd", "bwd", "fwd+bwd")


def make_inputs(layer: Layer, batch: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    k = layer.kernel_size
    out = output_size((layer.size,) * 2, (k, k), (layer.stride,) * 2, (k // 2,) * 2, (1, 1))
    x = torch.randn(batch, layer.channels, layer.size, layer.size, device="cuda", generator=gen)
    w = torch.randn(batch, layer.groups, k * k, *out, device="cuda", generator=gen) / k
    g = torch.randn(batch, layer.channels, *out, device="cuda", generator=gen)
    return x.to(dtype), w.to(dtype), g.to(dtype)


def involution_fn(backend: str, layer: Layer) -> Callable:
    def fn(x, w):
        return involution2d(x, w, layer.kernel_size, layer.stride, backend=backend)

    return fn


def _reference(x, w, kernel_size, stride):
    return involution2d(x, w, kernel_size, stride, backend="reference")


# One compiled function for all layers: dynamo specializes on (kernel_size, stride) and marks
# sizes dynamic after the first shape change, as it would in a network.
_compiled_reference = torch.compile(_reference)


def compiled_reference_fn(layer: Layer) -> Callable:
    def fn(x, w):
        return _compiled_reference(x, w, layer.kernel_size, layer.stride)

    return fn


def depthwise_fn(layer: Layer, dtype: torch.dtype) -> tuple[Callable, torch.Tensor]:
    k = layer.kernel_size
    weight = torch.randn(layer.channels, 1, k, k, device="cuda", dtype=dtype)

    def fn(x, w):
        return F.conv2d(x, w, stride=layer.stride, padding=k // 2, groups=layer.channels)

    return fn, weight


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def check(layer: Layer, batch: int, dtype: torch.dtype) -> tuple[float, float, float]:
    """Relative errors (out, grad_input, grad_kernel) of triton against the float64 reference."""
    x, w, g = make_inputs(layer, batch, dtype)
    results = []
    for backend, cast in (("triton", dtype), ("reference", torch.float64)):
        xi = x.to(cast).requires_grad_()
        wi = w.to(cast).requires_grad_()
        y = involution_fn(backend, layer)(xi, wi)
        gx, gw = torch.autograd.grad(y, (xi, wi), g.to(cast))
        results.append((y.detach(), gx, gw))
        del xi, wi, y
    errors = tuple(relative_error(a, b) for a, b in zip(*results, strict=True))
    del results
    torch.cuda.empty_cache()
    return errors  # type: ignore[return-value]


def autotune_timings() -> list[str]:
    """Per triton kernel (forward, grad_input, grad_kernel), the milliseconds the autotuner
    measured for each strip length ROWS on the last shape it tuned ("ROWS:ms ..."). ROWS = 1
    is the one-pixel-per-lane kernel, so this compares the register reuse with its absence."""
    tuners = (launch._forward, launch._grad_input, launch._grad_kernel)
    cells = []
    for tuner in tuners:
        timings = getattr(tuner, "configs_timings", None) or {}
        cells.append(
            " ".join(
                f"{config.kwargs['ROWS']}:{(t[0] if isinstance(t, list) else t):.3f}"
                for config, t in timings.items()
            )
        )
    return cells


def measure(fn: Callable, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> dict:
    """Median milliseconds and peak MiB above the inputs for fwd, bwd and fwd+bwd."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()

    def fwd():
        with torch.no_grad():
            return fn(x, w)

    y = fn(x, w)

    def bwd():
        return torch.autograd.grad(y, (x, w), g, retain_graph=True)

    def both():
        return torch.autograd.grad(fn(x, w), (x, w), g)

    result = {}
    for mode, run in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", both)):
        run()
        peak = peak_memory(run, "cuda") / 2**20
        ms = triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")
        result[mode] = (ms, peak)
    return result


def traffic(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> dict[str, int]:
    """Minimal bytes moved by each pass (see the module docstring)."""
    xb, wb, gb = (t.numel() * t.element_size() for t in (x, w, g))
    return {"fwd": xb + wb + gb, "bwd": gb + xb + wb + xb + wb}


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print(" | ".join(h.ljust(n) for h, n in zip(header, widths, strict=True)))
    print("-+-".join("-" * n for n in widths))
    for row in rows:
        print(" | ".join(str(c).ljust(n) for c, n in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=DTYPES)
    parser.add_argument("--layers", nargs="+", type=int, help="indices into LAYERS")
    parser.add_argument("--skip", nargs="*", default=[], help="backends to leave out")
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    # The backward is timed alone by replaying it on a retained graph, which donated buffers forbid.
    torch._functorch.config.donated_buffer = False
    layers = [LAYERS[i] for i in args.layers] if args.layers else LAYERS

    props = torch.cuda.get_device_properties(0)
    print(
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {props.name}, "
        f"torch {torch.__version__}, triton {triton.__version__}, batch {args.batch}"
    )
    copy_gbs = copy_bandwidth("cuda", nbytes=1 << 30) / 1e9
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s")

    row_format = "{:<15}| {:<13}| {:>8} | {:>8} | {:>8} | {:>8} | {:>8} | {:>11}"
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        rows, tuning_rows = [], []
        for layer in layers:
            # The first triton call on a shape autotunes it, so the timings belong to this layer.
            errors = check(layer, args.batch, dtype)
            rows.append([layer.name, *(f"{e:.1e}" for e in errors)])
            tuning_rows.append([layer.name, *autotune_timings()])
        print_table(
            f"[{dtype_name}] triton vs float64 reference: max |error| / max |reference|",
            ["layer", "out", "grad_input", "grad_kernel"],
            rows,
        )
        print_table(
            f"[{dtype_name}] autotuning: median ms per strip length ROWS (1 = no register reuse)",
            ["layer", "forward", "grad_input", "grad_kernel"],
            tuning_rows,
        )

        print(f"\n[{dtype_name}] median ms (do_bench) and peak MiB above the inputs")
        print(row_format.format("layer", "backend", *MODES, *(f"MiB {m}" for m in MODES)))
        bandwidth_rows = []
        for layer in layers:
            x, w, g = make_inputs(layer, args.batch, dtype)
            candidates = {
                "reference": involution_fn("reference", layer),
                "torch": involution_fn("torch", layer),
                "compile(ref)": compiled_reference_fn(layer),
                "triton": involution_fn("triton", layer),
            }
            results = {}
            for name, fn in candidates.items():
                if name not in args.skip:
                    results[name] = measure(fn, x, w, g)
                    torch.cuda.empty_cache()
            conv, weight = depthwise_fn(layer, dtype)
            results["dwconv"] = measure(conv, x, weight, g)
            for name, r in results.items():
                times = (f"{r[m][0]:.3f}" for m in MODES)
                memory = (f"{r[m][1]:.0f}" for m in MODES)
                print(row_format.format(layer.name, name, *times, *memory), flush=True)
            tri = results.get("triton")
            if tri is not None:
                moved = traffic(x, w, g)
                fwd_gbs = moved["fwd"] / tri["fwd"][0] / 1e6
                bwd_gbs = moved["bwd"] / tri["bwd"][0] / 1e6
                speedups = [
                    f"{results[n]['fwd+bwd'][0] / tri['fwd+bwd'][0]:.1f}x" if n in results else "-"
                    for n in ("reference", "torch", "compile(ref)", "dwconv")
                ]
                bandwidth_rows.append(
                    [
                        layer.name,
                        f"{fwd_gbs:.0f} ({100 * fwd_gbs / copy_gbs:.0f}%)",
                        f"{bwd_gbs:.0f} ({100 * bwd_gbs / copy_gbs:.0f}%)",
                        *speedups,
                    ]
                )
            del x, w, g
            torch.cuda.empty_cache()
        print_table(
            f"[{dtype_name}] triton GB/s (% of copy {copy_gbs:.0f} GB/s) and fwd+bwd speed-up "
            "of triton over",
            ["layer", "fwd", "bwd", "reference", "torch", "compile(ref)", "dwconv"],
            bandwidth_rows,
        )


if __name__ == "__main__":
    main()

"""Per-layer benchmark of the fused involution against the unfused layer, at RedNet-50's shapes.

* fused: ``functional.fused_involution2d(..., backend="triton")``: each pixel's kernel is
  generated on chip from the generator's hidden features and never stored
  (``ops/triton/fused_kernels.py``);
* unfused: the span as a 1x1 convolution, whose (B, G * K * K, H, W) kernel is written, read by
  ``involution2d(..., backend="triton")`` and saved for the backward.

For each involution layer of RedNet-50 (batch 64, channels_last) and each dtype:

1. check: max |fused - reference| / max |reference| of the output and of the gradients of
   input, features, weight and bias, against the float64 composition on the first
   ``--check-batch`` images;
2. time: median ms (``involution.benchmark.measure_time``) of the forward (no grad), the
   backward (replayed on a retained graph) and forward+backward, unfused, fused, and the speed-up
   unfused / fused;
3. memory: peak MiB above the inputs of forward+backward, and the MiB that the forward holds for
   the backward (the stored kernel, when unfused), with the ratio unfused / fused.

Each step runs under ``--step-timeout`` seconds; a step that runs over is recorded as "timeout"
and the script goes on. Tables are printed and written to ``OUT/fused_layers.txt`` and
``OUT/fused_layers.json`` with the environment and the command line.

``--sass`` needs no GPU: it compiles the four fused kernels for sm_90 at each layer's shape and
dtype with the ptxas that Triton ships (the arguments and specializations are those of a real
launch: ``fused_launch.forward_launch`` / ``backward_launches``), and writes registers per
thread, spill bytes, SASS instructions, tensor-core instructions (HGMMA/HMMA) and shared-memory
round trips (BAR) per kernel to ``OUT/fused_sass.{txt,json}``.

``--device cpu`` runs the measurement pipeline under ``TRITON_INTERPRET=1`` on tiny shapes to
check the script without a GPU; its numbers mean nothing.

Usage:
    PYTHONPATH=src python benchmarks/bench_fused_gpu.py --out DIR
    PYTHONPATH=src python benchmarks/bench_fused_gpu.py --sass --out DIR
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/bench_fused_gpu.py --device cpu \\
        --batch 1 --size-divisor 16 --layers 0 --dtypes float32 --warmup 0 --repeats 1 --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from involution.benchmark import measure_time, peak_memory
from involution.benchmark.report import environment, format_rows
from involution.functional import fused_involution2d, involution2d

MIB = 2**20


@dataclass(frozen=True)
class Layer:
    name: str
    channels: int
    size: int
    kernel_size: int
    stride: int
    group_channels: int = 16
    reduction_ratio: int = 4

    @property
    def groups(self) -> int:
        return self.channels // self.group_channels

    @property
    def hidden(self) -> int:
        return self.channels // self.reduction_ratio

    def out_size(self, divisor: int = 1) -> int:
        return -(-(self.size // divisor) // self.stride)


# RedNet-50 (models/rednet.py): the stem's 3x3 involution, then the 7x7 involution of each
# stage (stride 2 in the first block of stages 2-4, applied to the stage's input resolution).
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


class StepTimeout(Exception):
    pass


def _timed_out(error: BaseException) -> bool:
    """Whether ``error`` is, or was raised from, a StepTimeout (Triton's interpreter wraps the
    exceptions raised inside kernels)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, StepTimeout):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raises StepTimeout in the main thread once ``seconds`` have passed (0: no limit)."""

    def expire(signum, frame):
        raise StepTimeout(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def make_inputs(
    layer: Layer, batch: int, dtype: torch.dtype, device: str, divisor: int = 1, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Channels-last input, features and grad_out; the span's weight and bias (scaled so that
    kernels are O(1)), at ``layer``'s shape with spatial sizes divided by ``divisor``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    size, out = layer.size // divisor, layer.out_size(divisor)
    taps = layer.kernel_size**2

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        values = torch.randn(*shape, generator=gen, device=device) * scale
        return values.to(dtype)

    channels_last = torch.channels_last
    return {
        "input": rand(batch, layer.channels, size, size).contiguous(memory_format=channels_last),
        "features": rand(batch, layer.hidden, out, out).contiguous(memory_format=channels_last),
        "weight": rand(layer.groups * taps, layer.hidden, scale=layer.hidden**-0.5),
        "bias": rand(layer.groups * taps, scale=0.1),
        "grad_out": rand(batch, layer.channels, out, out).contiguous(memory_format=channels_last),
    }


def composed(layer: Layer, backend: str) -> Callable[..., torch.Tensor]:
    """The layer before the fusion: the span as a 1x1 convolution, whose kernel is stored (and
    saved for the backward), then the involution on ``backend``."""

    def fn(x, features, weight, bias):
        kernel = F.conv2d(features, weight[:, :, None, None], bias)
        kernel = kernel.view(x.shape[0], layer.groups, -1, *kernel.shape[2:])
        return involution2d(x, kernel, layer.kernel_size, layer.stride, backend=backend)

    return fn


def unfused(layer: Layer) -> Callable[..., torch.Tensor]:
    return composed(layer, "triton")


def fused(layer: Layer) -> Callable[..., torch.Tensor]:
    def fn(x, features, weight, bias):
        return fused_involution2d(
            x, features, weight, bias, layer.kernel_size, layer.stride, backend="triton"
        )

    return fn


LEAVES = ("input", "features", "weight", "bias")


def _outputs(fn: Callable, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> list:
    leaves = [tensors[k].detach().to(dtype).requires_grad_() for k in LEAVES]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, tensors["grad_out"].to(dtype))
    return [out.detach(), *grads]


def check(layer: Layer, tensors: dict[str, torch.Tensor], batch: int) -> dict[str, float]:
    """Relative max errors of fused against the float64 composition on ``batch`` images."""
    part = {k: v[:batch] if v.dim() == 4 else v for k, v in tensors.items()}
    got = _outputs(fused(layer), part, part["input"].dtype)
    want = _outputs(composed(layer, "torch"), part, torch.float64)
    names = ("out", *(f"grad_{k}" for k in LEAVES))
    return {
        name: ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        for name, a, b in zip(names, got, want, strict=True)
    }


def measure(
    fn: Callable, tensors: dict[str, torch.Tensor], device: str, warmup: int, repeats: int
) -> dict[str, float]:
    """Median ms of each pass, peak MiB of forward+backward, MiB held for the backward."""
    leaves = [tensors[k].detach().requires_grad_() for k in LEAVES]
    grad_out = tensors["grad_out"]
    result: dict[str, float] = {}

    def forward():
        with torch.no_grad():
            return fn(*leaves)

    def both():
        return torch.autograd.grad(fn(*leaves), leaves, grad_out)

    result["fwd_ms"] = measure_time(forward, device, warmup, repeats).median * 1e3
    result["bwd_ms"] = _backward_ms(fn(*leaves), leaves, grad_out, device, warmup, repeats)
    result["fwd+bwd_ms"] = measure_time(both, device, warmup, repeats).median * 1e3
    result["peak_mib"] = peak_memory(both, device) / MIB
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = fn(*leaves)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
        result["held_mib"] = held / MIB
        del out
    return result


def _backward_ms(out, leaves, grad_out, device: str, warmup: int, repeats: int) -> float:
    """Median ms of the backward alone, replayed on the retained graph of ``out``."""

    def backward():
        return torch.autograd.grad(out, leaves, grad_out, retain_graph=True)

    return measure_time(backward, device, warmup, repeats).median * 1e3


def _ratio(numerator: object, denominator: object) -> float | None:
    if isinstance(numerator, float) and isinstance(denominator, float) and denominator > 0:
        return numerator / denominator
    return None


def benchmark(args: argparse.Namespace, layers: list[Layer]) -> tuple[list[dict], list[dict]]:
    check_rows, rows = [], []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for layer in layers:
            tensors = make_inputs(layer, args.batch, dtype, args.device, args.size_divisor)
            head = {"layer": layer.name, "dtype": dtype_name}
            try:
                with time_limit(args.step_timeout):
                    errors = check(layer, tensors, args.check_batch)
            except Exception as error:
                if not _timed_out(error):
                    raise
                errors = {"check": f"timeout after {args.step_timeout} s"}  # type: ignore[dict-item]
            check_rows.append({**head, **errors})
            results = {}
            for name, make in (("unfused", unfused), ("fused", fused)):
                try:
                    with time_limit(args.step_timeout):
                        results[name] = measure(
                            make(layer), tensors, args.device, args.warmup, args.repeats
                        )
                except Exception as error:
                    if not _timed_out(error):
                        raise
                    results[name] = {"status": f"timeout after {args.step_timeout} s"}
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            row: dict[str, object] = dict(head)
            for key in ("fwd_ms", "bwd_ms", "fwd+bwd_ms", "peak_mib", "held_mib"):
                before, after = results["unfused"].get(key), results["fused"].get(key)
                if before is None and after is None:
                    continue
                row[f"{key}_unfused"] = before
                row[f"{key}_fused"] = after
                row[f"{key}_x"] = _ratio(before, after)
            for name in ("unfused", "fused"):
                if "status" in results[name]:
                    row[f"status_{name}"] = results[name]["status"]
            rows.append(row)
            print(f"{layer.name} {dtype_name}: {row}", flush=True)
            del tensors
    return check_rows, rows


# --- static profile for sm_90, compiled on any machine --------------------------------------


def compile_for_sm90(launch) -> object:
    """Compiles ``launch`` (a ``fused_launch.Launch``) for sm_90 as its real launch would be:
    same arguments, so the same specializations (integers equal to 1, divisibility by 16).
    Uses Triton 3.6's launcher internals, so that no GPU is needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, launch.kwargs, bound, specialization, options
    )
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def layer_launches(layer: Layer, batch: int, dtype: torch.dtype) -> dict[str, object]:
    """The four fused kernels' launches at ``layer``'s shape, on CPU tensors (never run)."""
    from involution.ops.triton import fused_launch

    tensors = make_inputs(layer, batch, dtype, "cpu")
    x, f, w, b, y = (tensors[k] for k in ("input", "features", "weight", "bias", "grad_out"))
    k = layer.kernel_size
    geometry = ((k, k), (layer.stride,) * 2, (k // 2, k // 2), (1, 1))
    chunks = fused_launch.weight_chunks(batch * layer.out_size() ** 2, layer.groups)
    partial_weight = torch.empty(chunks, *w.shape)
    partial_bias = torch.empty(chunks, w.shape[0])
    forward = fused_launch.forward_launch(x, f, w, b, *geometry, y)
    backward = fused_launch.backward_launches(
        y, x, f, w, b, *geometry, torch.empty_like(x), torch.empty_like(f), partial_weight,
        partial_bias,
    )  # fmt: skip
    names = ("grad_features", "grad_weight", "grad_input")
    return {"forward": forward, **dict(zip(names, backward, strict=True))}


def sass(args: argparse.Namespace, layers: list[Layer]) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).parent))
    from kernel_sass import machine_code_stats

    rows = []
    for dtype_name in args.dtypes:
        for layer in layers:
            for name, launch in layer_launches(layer, args.batch, DTYPES[dtype_name]).items():
                compiled = compile_for_sm90(launch)
                registers, stack, opcodes = machine_code_stats(compiled.asm["cubin"])
                row = {
                    "layer": layer.name,
                    "dtype": dtype_name,
                    "kernel": name,
                    "warps": launch.kwargs["num_warps"],
                    "regs": registers,
                    "spill_bytes": stack,
                    "instr": sum(opcodes.values()),
                    "mma": sum(n for op, n in opcodes.items() if "MMA" in op),
                    "mma_kind": "/".join(sorted(op for op in opcodes if "MMA" in op)) or None,
                    "bar": opcodes["BAR"],
                    "ldg": opcodes["LDG"],
                    "ffma": opcodes["FFMA"],
                }
                rows.append(row)
                print(
                    f"{layer.name} {dtype_name} {name}: {registers} registers, {stack} spill bytes",
                    flush=True,
                )
    return rows


def write(out: Path, stem: str, sections: dict[str, list[dict]], metadata: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    text = [f"{key}: {value}" for key, value in metadata.items()]
    for title, rows in sections.items():
        text += ["", f"## {title}", "", format_rows(rows, "table")]
    (out / f"{stem}.txt").write_text("\n".join(text) + "\n")
    print("\n" + "\n".join(text))
    document = {"metadata": metadata, **sections}
    (out / f"{stem}.json").write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {out / stem}.txt and .json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=DTYPES)
    parser.add_argument("--layers", nargs="+", type=int, help="indices into LAYERS (default all)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--check-batch", type=int, default=2, help="images in the error check")
    parser.add_argument("--step-timeout", type=int, default=300, help="seconds per step")
    parser.add_argument(
        "--size-divisor", type=int, default=1, help="divide spatial sizes (tiny CPU runs)"
    )
    parser.add_argument("--sass", action="store_true", help="static sm_90 profile, no GPU")
    args = parser.parse_args(argv)
    for name in ("batch", "repeats", "check_batch", "size_divisor"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} ({getattr(args, name)}) must be >= 1")
    if args.warmup < 0:
        parser.error(f"--warmup ({args.warmup}) must be >= 0")
    if args.layers and not all(0 <= i < len(LAYERS) for i in args.layers):
        parser.error(f"--layers ({args.layers}) must be indices in [0, {len(LAYERS)})")
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if args.sass and interpreted:
        parser.error("--sass compiles for sm_90: unset TRITON_INTERPRET")
    if not args.sass and args.device == "cpu" and not interpreted:
        parser.error("--device cpu runs the kernels in Triton's interpreter: TRITON_INTERPRET=1")
    if not args.sass and args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (use --sass for the static profile)")
    layers = [LAYERS[i] for i in args.layers] if args.layers else LAYERS
    metadata = {
        **environment(args.device if not args.sass else "cpu"),
        "command": shlex.join(["python", *sys.argv]),
        "batch": args.batch,
    }
    if args.sass:
        import triton

        metadata["target"] = f"sm_90, triton {triton.__version__}"
        write(args.out, "fused_sass", {"sm_90 static profile": sass(args, layers)}, metadata)
        return
    metadata["size_divisor"] = args.size_divisor
    metadata["float32 dots"] = "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    check_rows, rows = benchmark(args, layers)
    sections = {
        "fused vs float64 composition: max |error| / max |reference|": check_rows,
        "unfused vs fused (channels_last): ms, MiB, and x = unfused / fused": rows,
    }
    write(args.out, "fused_layers", sections, metadata)


if __name__ == "__main__":
    main()

"""Static profile of the Triton kernels for an H100/H200 (sm_90), compiled on any machine.

No GPU is needed: Triton compiles each kernel for the target with the ``ptxas`` it ships, and
``cuobjdump`` (also shipped) reads back the machine code. The launch parameters are those the
launcher (``ops/triton/launch.py``) picks for a RedNet-50 layer of the given stride (16 channels
per group), in NCHW (contiguous input and kernel) or channels_last (channels_last input,
pixel-major kernel) layout. For each kernel, layout, dtype and strip length this prints:

- registers per thread, spill stack and shared memory in bytes;
- SASS instructions, FFMA instructions, and instructions per FFMA;
- global loads by width (``LDG`` 32-bit or narrower, ``.64``, ``.128``), global stores, and
  shared-memory loads and stores (layout conversions go through shared memory);
- the wall time of the compilation (Triton's passes and ptxas) on this machine.

These are counts, not times: they show whether a configuration spills, whether loads are
vectorized, and how many instructions each multiply-add costs.

``--variants`` counts the distinct compiled variants RedNet-50 training needs. ``--host``
measures the host's Python time per call of the launcher (``launch.forward`` etc., the kernel
launch itself left out) and of the whole op (argument checks, backend choice, custom op,
autograd) on CPU tensors with the launches left out: the part of the per-call floor that does
not depend on the GPU (allocations aside: CPU ones cost more than the CUDA caching allocator's).

Usage:
    PYTHONPATH=src python benchmarks/kernel_sass.py [--kernel-size 7] [--stride 1 2] [--rows 1 2]
    PYTHONPATH=src python benchmarks/kernel_sass.py --variants   # what RedNet-50 compiles
    PYTHONPATH=src TRITON_INTERPRET=1 python benchmarks/kernel_sass.py --host
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from involution.ops.triton import fused_launch, launch
from involution.ops.triton.plan import Plan

OPS = ("forward", "grad_input", "grad_kernel")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_GROUP_CHANNELS = 16
# RedNet-50's involution layers: (channels, input size, kernel size, stride).
REDNET50 = [
    (32, 112, 3, 1),
    (64, 56, 7, 1),
    (128, 56, 7, 2),
    (128, 28, 7, 1),
    (256, 28, 7, 2),
    (256, 14, 7, 1),
    (512, 14, 7, 2),
    (512, 7, 7, 1),
]


def plan(op: str, channels_last: bool, dtype: torch.dtype, layer: tuple, batch: int = 64):
    """The launcher's plan for one op at a layer, from meta tensors (nothing runs)."""
    channels, size, k, s = layer
    groups = channels // _GROUP_CHANNELS
    out = (size + 2 * (k // 2) - k) // s + 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(batch, channels, size, size, device="meta", dtype=dtype, memory_format=fmt)
    g = torch.empty(batch, channels, out, out, device="meta", dtype=dtype, memory_format=fmt)
    w = torch.empty(batch, groups * k * k, out, out, device="meta", dtype=dtype, memory_format=fmt)
    w = w.view(batch, groups, k * k, out, out)
    geometry = ([k, k], [s, s], [k // 2, k // 2], [1, 1])
    captured = []
    with mock.patch.object(Plan, "launch", lambda self, *t: captured.append(self)):
        launch._PLANS.clear()
        if op == "forward":
            launch.forward(x, w, *geometry)
        elif op == "grad_input":
            launch.grad_input(g, w, [size, size], *geometry)
        else:
            launch.grad_kernel(g, x, *geometry, groups)
    return captured[0]


def compile_for_sm90(found, dtype: torch.dtype):
    """Compiles a plan's kernel for sm_90; returns it and the seconds the compilation took."""
    fn = found.kernel
    signature = {}
    for name in fn.arg_names:
        if name.endswith("_ptr"):
            signature[name] = _POINTER_TYPES[dtype]
        elif name in found.constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
    # Pointers from torch's allocator are 16-byte aligned; Triton specializes on that.
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(3)}
    source = ASTSource(fn=fn, signature=signature, constexprs=dict(found.constexprs), attrs=attrs)
    start = time.perf_counter()
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": found.num_warps}
    )
    return compiled, time.perf_counter() - start


def machine_code_stats(cubin: bytes) -> tuple[int, int, collections.Counter]:
    """(registers, stack bytes, opcode counts with modifiers) of a cubin, via cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        Path(path).write_bytes(cubin)
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True)
        usage = subprocess.run(
            [tool, "-res-usage", path], capture_output=True, text=True, check=True
        )
    opcodes: collections.Counter = collections.Counter()
    for line in sass.stdout.splitlines():
        match = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if match:
            opcodes[match.group(1)] += 1
    registers = int(re.search(r"REG:(\d+)", usage.stdout).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage.stdout).group(1))
    return registers, stack, opcodes


def summarize(opcodes: collections.Counter) -> dict[str, int]:
    """Counts by kind: global loads by width, stores, shared-memory traffic, FFMA."""
    counts: dict[str, int] = collections.Counter()
    for op, n in opcodes.items():
        base, *mods = op.split(".")
        counts["instr"] += n
        if base == "LDG":
            width = "128" if "128" in mods else "64" if "64" in mods else "32"
            counts[f"LDG{width}"] += n
        elif base in ("STG", "LDS", "STS", "FFMA", "SHFL"):
            counts[base] += n
    return counts


def print_table(header: list[str], rows: list[list[object]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(" | ".join(h.ljust(n) for h, n in zip(header, widths, strict=True)))
    print("-+-".join("-" * n for n in widths))
    for row in rows:
        print(" | ".join(str(c).ljust(n) for c, n in zip(row, widths, strict=True)), flush=True)


def profile(args: argparse.Namespace) -> None:
    print(
        f"sm_90, triton {triton.__version__}, K={args.kernel_size}, {_GROUP_CHANNELS} channels "
        f"per group, RedNet-50 layer of each stride at batch 64; compile times on this CPU"
    )
    header = ["kernel", "layout", "dtype", "S", "ROWS", "BLOCK_P", "regs", "stack", "smem"]
    header += ["instr", "FFMA", "instr/FFMA", "LDG32", "LDG64", "LDG128", "STG", "LDS", "STS"]
    header += ["SHFL", "compile s"]
    rows = []
    for op in args.ops:
        for layout_name in args.layouts:
            for dtype_name in args.dtypes:
                for stride in args.stride:
                    layer = (64 * stride, 56, args.kernel_size, stride)
                    for strip in args.rows:
                        with mock.patch.object(launch, "strip_rows", lambda _h, r=strip: r):
                            found = plan(op, layout_name == "cl", DTYPES[dtype_name], layer)
                        compiled, seconds = compile_for_sm90(found, DTYPES[dtype_name])
                        registers, stack, opcodes = machine_code_stats(compiled.asm["cubin"])
                        c = summarize(opcodes)
                        rows.append(
                            [
                                op,
                                layout_name,
                                dtype_name,
                                stride,
                                strip,
                                found.constexprs["BLOCK_P"],
                                registers,
                                stack,
                                compiled.metadata.shared,
                                c["instr"],
                                c["FFMA"],
                                f"{c['instr'] / max(c['FFMA'], 1):.2f}",
                                c["LDG32"],
                                c["LDG64"],
                                c["LDG128"],
                                c["STG"],
                                c["LDS"],
                                c["STS"],
                                c["SHFL"],
                                f"{seconds:.1f}",
                            ]
                        )
    print_table(header, rows)


def variants(args: argparse.Namespace) -> None:
    """Distinct compiled variants (kernel and compile-time parameters) RedNet-50 needs."""
    for layout_name in args.layouts:
        for dtype_name in args.dtypes:
            keys = set()
            for layer in REDNET50:
                for op in OPS:
                    found = plan(op, layout_name == "cl", DTYPES[dtype_name], layer)
                    keys.add((op, tuple(sorted(found.constexprs.items()))))
            per_op = collections.Counter(op for op, _ in keys)
            print(
                f"RedNet-50 training, {layout_name}, {dtype_name}: {len(keys)} variants "
                f"({', '.join(f'{op} {per_op[op]}' for op in OPS)})"
            )


def _per_call_us(fn, calls: int) -> float:
    """Microseconds per call, best of 5 rounds of ``calls`` calls."""
    for _ in range(20):
        fn()
    rounds = []
    for _ in range(5):
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - begin) / calls * 1e6)
    return min(rounds)


def host(args: argparse.Namespace) -> None:
    """Host time per call at RedNet-50's s3 256@14 layer (batch 64, bfloat16, channels_last),
    plain and fused ops."""
    from involution.functional import involution2d

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--host needs TRITON_INTERPRET=1 (the op then accepts CPU tensors)")
    torch.set_num_threads(1)
    x = torch.randn(64, 256, 14, 14, dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 16 * 49, 14, 14, dtype=torch.bfloat16)
    w = w.contiguous(memory_format=torch.channels_last).view(64, 16, 49, 14, 14)
    g = torch.randn_like(x)
    geometry = ([7, 7], [1, 1], [3, 3], [1, 1])
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

    def forward_backward():
        y = involution2d(xg, wg, 7, backend="triton")
        torch.autograd.grad(y, (xg, wg), g)

    def forward():
        with torch.no_grad():
            involution2d(x, w, 7, backend="triton")

    # The fused op's passes at the same layer (R = 64 hidden features).
    f = torch.randn(64, 64, 14, 14, dtype=torch.bfloat16)
    f = f.contiguous(memory_format=torch.channels_last)
    span_weight = torch.randn(16 * 49, 64, dtype=torch.bfloat16)
    span_bias = torch.randn(16 * 49, dtype=torch.bfloat16)
    fused = (x, f, span_weight, span_bias)
    out = torch.empty_like(x)
    partials = (torch.empty(1, 16 * 49, 64), torch.empty(1, 16 * 49))
    grads = (torch.empty_like(x), torch.empty_like(f), *partials)

    cases = {
        "fused_launch.fused_forward (plan lookup, output)": lambda: fused_launch.fused_forward(
            *fused, *geometry
        ),
        "fused_launch.fused_backward (plan lookup, outputs, partial sums)": lambda: (
            fused_launch.fused_backward(g, *fused, *geometry)
        ),
        "fused forward's launch arguments, built (no plan)": lambda: fused_launch.forward_launch(
            *fused, *geometry, out
        ),
        "fused backward's launch arguments, built (no plan)": lambda: (
            fused_launch.backward_launches(g, *fused, *geometry, *grads)
        ),
        "launch.forward": lambda: launch.forward(x, w, *geometry),
        "launch.grad_input": lambda: launch.grad_input(g, w, [14, 14], *geometry),
        "launch.grad_kernel": lambda: launch.grad_kernel(g, x, *geometry, 16),
        "torch.empty_like (one output)": lambda: torch.empty_like(x),
        "involution2d forward (no grad)": forward,
        "involution2d forward + both gradients": forward_backward,
    }
    print("host time per call, kernel launches left out, 1 thread; microseconds")
    with mock.patch.object(Plan, "launch", lambda self, *tensors: None):
        rows = [[name, f"{_per_call_us(fn, args.calls):.1f}"] for name, fn in cases.items()]
    print_table(["call", "us"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--stride", type=int, nargs="+", default=[1])
    parser.add_argument("--rows", type=int, nargs="+", default=list(launch.STRIP_ROWS))
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--layouts", nargs="+", default=["nchw", "cl"], choices=["nchw", "cl"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=DTYPES)
    parser.add_argument(
        "--variants", action="store_true", help="count RedNet-50's compiled variants instead"
    )
    parser.add_argument("--host", action="store_true", help="host time per call instead")
    parser.add_argument("--calls", type=int, default=1000, help="calls per round for --host")
    args = parser.parse_args()
    if args.host:
        host(args)
    elif args.variants:
        variants(args)
    else:
        profile(args)


if __name__ == "__main__":
    main()

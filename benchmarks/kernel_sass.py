"""Static profile of the Triton kernels for an H100/H200 (sm_90), compiled on any machine.

No GPU is needed: Triton compiles each kernel for the target with the ``ptxas`` it ships, and
``cuobjdump`` (also shipped) reads back the machine code. For each kernel, dtype and strip length
ROWS this prints the registers per thread, the spill stack in bytes, the number of SASS
instructions and of global loads, and both per fused multiply-add of the kernel body (16 channels
per group, all in one chunk, so the body holds every FMA of ROWS pixels of one lane).

These are counts, not times: they show how many instructions the register reuse removes and
whether a configuration spills, which decides nothing about speed on its own.

Usage:
    PYTHONPATH=src python benchmarks/kernel_sass.py [--kernel-size 7] [--stride 1] [--rows 1 2 3]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from involution.ops.triton import kernels

KERNELS = {
    "forward": kernels.involution_forward_kernel,
    "grad_input": kernels.involution_grad_input_kernel,
    "grad_kernel": kernels.involution_grad_kernel_kernel,
}
TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_RUNTIME_INTS = {"NR", "D", "H", "W", "OD", "OH", "OW"}
_CHANNELS = 16
_LANES = 128


def compile_for_sm90(fn, dtype: str, kernel_size: int, stride: int, rows: int):
    """Compiles ``fn`` for sm_90 at a 2D geometry with 'same' padding, 128 lanes, 4 warps."""
    signature = {}
    for name in fn.arg_names:
        if name.endswith("_ptr"):
            signature[name] = "*" + TYPES[dtype]
        elif name in _RUNTIME_INTS:
            signature[name] = "i32"
        else:
            signature[name] = "constexpr"
    values = {
        "CG": _CHANNELS,
        "KD": 1,
        "KH": kernel_size,
        "KW": kernel_size,
        "SD": 1,
        "SH": stride,
        "SW": stride,
        "PD": 0,
        "PH": kernel_size // 2,
        "PW": kernel_size // 2,
        "DD": 1,
        "DH": 1,
        "DW": 1,
        "BLOCK_C": _CHANNELS,
        "BLOCK_P": _LANES,
        "ROWS": rows,
    }
    constants = {name: v for name, v in values.items() if signature.get(name) == "constexpr"}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def machine_code_stats(cubin: bytes) -> tuple[int, int, collections.Counter]:
    """(registers, stack bytes, opcode counts) of a cubin, read with Triton's cuobjdump."""
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
        match = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if match:
            opcodes[match.group(1)] += 1
    registers = int(re.search(r"REG:(\d+)", usage.stdout).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage.stdout).group(1))
    return registers, stack, opcodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=TYPES)
    args = parser.parse_args()
    print(
        f"sm_90, triton {triton.__version__}, K={args.kernel_size}, stride {args.stride}, "
        f"{_CHANNELS} channels per group, {_LANES} lanes, 4 warps"
    )
    header = [
        "kernel",
        "dtype",
        "ROWS",
        "regs",
        "stack",
        "instr",
        "loads",
        "instr/FMA",
        "loads/FMA",
    ]
    print(" | ".join(header))
    for name, fn in KERNELS.items():
        for dtype in args.dtypes:
            for rows in args.rows:
                compiled = compile_for_sm90(fn, dtype, args.kernel_size, args.stride, rows)
                registers, stack, opcodes = machine_code_stats(compiled.asm["cubin"])
                total, loads = sum(opcodes.values()), opcodes["LDG"]
                fmas = args.kernel_size**2 * _CHANNELS * rows
                print(
                    f"{name} | {dtype} | {rows} | {registers} | {stack} | {total} | {loads} | "
                    f"{total / fmas:.2f} | {loads / fmas:.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()

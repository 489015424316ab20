"""Export a model to ONNX or to a torch.export program, and check it against PyTorch.

The exported graph holds standard operators only (involution becomes plain tensor operations),
with dynamic batch, height and width. Right after writing, the exported model runs on two random
inputs of different batch and spatial sizes (ONNX with onnxruntime, a program after
torch.export.load) next to the PyTorch model; the largest absolute difference is printed and the
command fails (exit 1) above --atol. Examples:

  involution export --model rednet26 --format onnx --output rednet26.onnx
  involution export --weights run/best.safetensors --format exported-program
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from involution.cli._options import (
    EXPECTED_ERRORS,
    add_model_arguments,
    build_model,
    fail,
    input_channels,
)
from involution.export import (
    export_onnx,
    export_program,
    onnx_max_abs_diff,
    program_max_abs_diff,
)

FORMATS = {"onnx": ".onnx", "exported-program": ".pt2"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--format", choices=FORMATS, default="onnx", help="output format (default: onnx)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="file to write (default: the model name with .onnx or .pt2, in the current folder)",
    )
    parser.add_argument(
        "--image-size", type=int, default=224, help="height and width to trace at (default: 224)"
    )
    parser.add_argument("--batch-size", type=int, default=2, help="batch to trace at (default: 2)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset version (default: 18)")
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="largest absolute difference allowed against PyTorch (default: 1e-4)",
    )


def run(args: argparse.Namespace) -> int:
    if not args.verbose:
        # The ONNX optimizer logs one line per rewrite at INFO level: thousands for RedNet.
        logging.getLogger("onnxscript").setLevel(logging.WARNING)
    try:
        if args.image_size < 1 or args.batch_size < 1:
            raise ValueError(
                f"--image-size ({args.image_size}) and --batch-size ({args.batch_size}) must be >= 1"
            )
        model = build_model(args)
        channels = input_channels(model)
        name = args.model or args.weights.stem
        output = args.output or Path(name + FORMATS[args.format])
        size, batch = args.image_size, args.batch_size
        example = torch.randn(batch, channels, size, size)
        # A second input of other batch and spatial sizes shows that they stay dynamic.
        inputs = [example, torch.randn(batch + 1, channels, size + size // 4, size + size // 8)]
        if args.format == "onnx":
            export_onnx(model, output, example, opset=args.opset)
            diff = onnx_max_abs_diff(output, model, inputs)
            checker = "onnxruntime"
        else:
            export_program(model, output, example)
            diff = program_max_abs_diff(output, model, inputs)
            checker = "torch.export.load"
    except EXPECTED_ERRORS as error:
        if args.verbose:
            raise
        return fail("export", error)
    shapes = ", ".join("x".join(map(str, x.shape)) for x in inputs)
    print(f"wrote {output}")
    print(f"max abs diff, {checker} vs PyTorch on inputs {shapes}: {diff:.3g}")
    if not diff <= args.atol:
        print(
            f"involution export: error: max abs diff {diff:.3g} is above --atol {args.atol:g}",
            file=sys.stderr,
        )
        return 1
    return 0

"""Export a model to ONNX or to a torch.export program, and check it against PyTorch.

The exported graph holds standard operators only (each involution becomes a Gather and a batched
MatMul), with dynamic batch, height and width. Right after writing, the exported model runs on
two random inputs of different batch and spatial sizes (ONNX with onnxruntime, a program after
torch.export.load) next to the PyTorch model; the largest absolute difference is printed and the
command fails (exit 1) above --atol. One line per stage (build, export, check) says what it did
and how long it took; -v adds the exporters' own log messages and warnings. Examples:

  involution export --model rednet26 --format onnx --output rednet26.onnx
  involution export --weights run/best.safetensors --format exported-program
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
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
    onnx_op_counts,
    program_max_abs_diff,
)

FORMATS = {"onnx": ".onnx", "exported-program": ".pt2"}
# The input size of models that do not give their own (``image_size``, as RedNet does).
_IMAGE_SIZE = 224


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
        "--image-size",
        type=int,
        help="height and width to trace at (default: the model's own, 32 for the *_cifar models, "
        "else 224)",
    )
    parser.add_argument("--batch-size", type=int, default=2, help="batch to trace at (default: 2)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset version (default: 18)")
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="largest absolute difference allowed against PyTorch (default: 1e-4)",
    )


@contextlib.contextmanager
def _stage(text: str) -> Iterator[list[str]]:
    """Prints ``text ...`` now and, once the stage is done, its time and the notes it added."""
    print(f"{text} ...", end=" ", flush=True)
    notes: list[str] = []
    start = time.perf_counter()
    try:
        yield notes
    except BaseException:
        print("failed", flush=True)
        raise
    print(", ".join([f"{time.perf_counter() - start:.1f} s", *notes]), flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        if (args.image_size is not None and args.image_size < 1) or args.batch_size < 1:
            raise ValueError(
                f"--image-size ({args.image_size}) and --batch-size ({args.batch_size}) must be >= 1"
            )
        # Checked before the first stage line, which names the model.
        if args.model is None and args.weights is None:
            raise ValueError("give --model NAME, or --weights PATH of a saved model")
        name = args.model or args.weights.stem
        with _stage(f"building {name}") as notes:
            model = build_model(args)
            channels = input_channels(model)
            notes.append(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
        output = args.output or Path(name + FORMATS[args.format])
        size = args.image_size
        if size is None:
            size = getattr(model, "image_size", _IMAGE_SIZE)
        batch = args.batch_size
        example = torch.randn(batch, channels, size, size)
        # A second input of other batch and (odd, smaller, so the check stays quick) spatial
        # sizes shows that they stay dynamic.
        other = (size * 3 // 4 + 1, size * 7 // 8 + 1)
        inputs = [example, torch.randn(batch + 1, channels, *other)]
        shapes = ", ".join("x".join(map(str, x.shape)) for x in inputs)
        if args.format == "onnx":
            with _stage(f"exporting to {output} (ONNX opset {args.opset})") as notes:
                export_onnx(model, output, example, opset=args.opset, verbose=args.verbose)
                notes.append(f"{sum(onnx_op_counts(output).values())} nodes")
            with _stage("checking with onnxruntime against PyTorch") as notes:
                diff = onnx_max_abs_diff(output, model, inputs)
                notes.append(f"max abs diff {diff:.3g} on inputs {shapes}")
        else:
            with _stage(f"exporting to {output} (torch.export program)"):
                export_program(model, output, example, verbose=args.verbose)
            with _stage("checking with torch.export.load against PyTorch") as notes:
                diff = program_max_abs_diff(output, model, inputs)
                notes.append(f"max abs diff {diff:.3g} on inputs {shapes}")
    except EXPECTED_ERRORS as error:
        if args.verbose:
            raise
        return fail("export", error)
    if not diff <= args.atol:
        print(
            f"involution export: error: max abs diff {diff:.3g} is above --atol {args.atol:g}",
            file=sys.stderr,
        )
        return 1
    return 0

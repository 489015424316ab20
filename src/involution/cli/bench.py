"""Benchmark the involution op or whole models; print a table, CSV or JSON, draw a bar chart.

  involution bench op      each involution backend against KxK depthwise and dense convolutions
                           at the same shape: forward, backward and forward+backward median
                           time, peak memory, GB/s and the floor set by a measured copy bandwidth
  involution bench model   registered models side by side: parameters, multiply-adds, inference
                           and training images per second, peak memory
  involution bench onnx    registered models exported to ONNX and timed in onnxruntime on the
                           CPU (deployment latency)

Timing: warm-up calls, then the median of the repeats (perf_counter on the CPU, CUDA events on
GPUs). On the CPU, ``op`` and ``model`` run as ``involution train`` does, with the memory that
one call frees kept mapped for the next (``involution.training.memory.keep_freed_memory``); the
metadata says whether it was. Peak memory: above what was live before the call (CUDA allocator
statistics; on the CPU the allocations recorded by torch.profiler). Examples:

  involution bench op --device cpu --backends reference torch cpu --baselines depthwise \\
      --passes forward forward+backward --channels-last
  involution bench model --models rednet50 resnet50 --batch-size 32 --plot models.png
  involution bench onnx --models rednet26 rednet50 rednet101 resnet50 resnet101 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from involution.benchmark import model as model_bench
from involution.benchmark import op as op_bench
from involution.benchmark.report import FORMATS, bar_chart, environment, format_rows
from involution.cli._options import (
    EXPECTED_ERRORS,
    add_device_arguments,
    add_verbose_argument,
    fail,
    input_channels,
    parse_model_args,
    setup_device,
)
from involution.training.memory import keep_freed_memory

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    add_verbose_argument(parser)
    add_device_arguments(parser)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default: 2)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls (default: 10)")
    parser.add_argument(
        "--format", choices=FORMATS, default="table", help="output format (default: table)"
    )
    parser.add_argument("--output", type=Path, help="write the results here instead of stdout")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also draw a bar chart here")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    op = sub.add_parser(
        "op",
        help="the involution op against convolutions at the same shape",
        description=(
            "Times each involution backend with a random K*K kernel per pixel against a KxK "
            "depthwise and a KxK dense conv2d with the same input, stride and padding. Columns: "
            "median_ms/min_ms per call; peak_mib, memory the call adds at its peak (its output "
            "included); peak_vs_operands, that peak over the bytes of input + kernel (or "
            "weight); moved_mb, bytes each pass must read and write at least; gb_per_s, those "
            "bytes over the median time; copy_gb_per_s, the bandwidth of a large copy timed "
            "right after the pass; floor_ms, moved bytes over that bandwidth; floor_fraction, "
            "floor_ms / median_ms; vs_reference, how many times faster than the reference "
            "backend."
        ),
    )
    op.epilog = (
        "The CPU tables of BENCHMARKS.md (RedNet shapes and the 8x256x56x56 target, K=7, G=C/16, "
        "float32), NCHW and channels-last:\n  involution bench op --device cpu --backends "
        "reference torch cpu --baselines depthwise --passes forward forward+backward "
        "[--channels-last]"
    )
    op.formatter_class = argparse.RawDescriptionHelpFormatter
    op.add_argument(
        "--shapes",
        nargs="+",
        type=op_bench.OpShape.parse,
        default=list(op_bench.REDNET_SHAPES),
        metavar="BxCxHxW",
        help="input shapes (default: RedNet's "
        + " ".join(str(s) for s in op_bench.REDNET_SHAPES)
        + ")",
    )
    op.add_argument("--kernel-size", type=int, default=7, help="K (default: 7)")
    op.add_argument("--stride", type=int, default=1, help="stride (default: 1)")
    op.add_argument(
        "--group-channels",
        type=int,
        default=16,
        help="channels per involution group, G = C / group_channels (default: 16)",
    )
    op.add_argument(
        "--backends",
        nargs="+",
        metavar="NAME",
        help="involution backends (default: every one that runs on --device)",
    )
    op.add_argument(
        "--baselines",
        nargs="*",
        choices=op_bench.BASELINES,
        default=list(op_bench.BASELINES),
        help="convolution yardsticks (default: both)",
    )
    op.add_argument(
        "--passes",
        nargs="+",
        choices=op_bench.PASSES,
        default=list(op_bench.PASSES),
        help="passes to measure (default: all)",
    )
    op.add_argument("--dtype", choices=_DTYPES, default="float32", help="(default: float32)")
    op.add_argument(
        "--channels-last",
        action="store_true",
        help="channels-last inputs and pixel-major involution kernels (default: NCHW)",
    )
    op.add_argument(
        "--copy-mib",
        type=int,
        default=256,
        help="size of the copy that measures the memory bandwidth after each pass; 0 skips "
        "it and the copy and floor columns (default: 256)",
    )
    _add_output_arguments(op)
    op.set_defaults(_bench=_run_op)

    model = sub.add_parser(
        "model",
        help="registered models side by side",
        description=(
            "For each model: params_m (millions), gmacs (multiply-adds per image, 1e9), and per "
            "mode the images per second at the median step time and the peak memory of a step. "
            "Training is one SGD step on random images and labels."
        ),
    )
    model.add_argument(
        "--models",
        nargs="+",
        default=["rednet50", "resnet50"],
        help="registered model names, all checked before the first is measured "
        "(`involution list-models` lists them; default: %(default)s)",
    )
    model.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="builder keyword argument for every model, e.g. base_width=16 (repeatable)",
    )
    model.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    model.add_argument("--image-size", type=int, default=224, help="(default: 224)")
    model.add_argument(
        "--modes",
        nargs="+",
        choices=model_bench.MODES,
        default=list(model_bench.MODES),
        help="(default: both)",
    )
    model.add_argument("--amp", action="store_true", help="autocast to bfloat16")
    model.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    model.add_argument("--compile", action="store_true", help="torch.compile the models")
    _add_output_arguments(model)
    model.set_defaults(_bench=_run_model)

    deploy = sub.add_parser(
        "onnx",
        help="models exported to ONNX and timed in onnxruntime on the CPU",
        description=(
            "Exports each model as `involution export` does (standard operators, dynamic batch "
            "and size), then times onnxruntime's CPU provider on random images at each batch "
            "size. Columns: batch; threads, onnxruntime's intra-op threads; export_s, seconds "
            "the export took; nodes, of the ONNX graph; median_ms/min_ms per call; img_s, "
            "images per second at the median; vs_BASELINE, median_ms over the baseline model's "
            "at the same batch."
        ),
    )
    deploy.add_argument(
        "--models",
        nargs="+",
        default=["rednet26", "rednet50", "rednet101", "resnet50", "resnet101"],
        help="(default: %(default)s)",
    )
    deploy.add_argument(
        "--baseline",
        default="resnet50",
        help="model the ratio column compares with (default: %(default)s)",
    )
    deploy.add_argument(
        "--batch-sizes", nargs="+", type=int, default=[1, 8], help="(default: %(default)s)"
    )
    deploy.add_argument("--image-size", type=int, default=224, help="(default: 224)")
    _add_output_arguments(deploy)
    # onnxruntime's CPU provider; --threads sets its intra-op threads (default: all cores).
    deploy.set_defaults(_bench=_run_onnx, device="cpu")


def _run_op(args: argparse.Namespace, device: torch.device) -> tuple[list, dict, dict]:
    dtype = _DTYPES[args.dtype]
    metadata: dict[str, object] = environment(device)
    metadata.update(
        kernel_size=args.kernel_size,
        stride=args.stride,
        group_channels=args.group_channels,
        dtype=args.dtype,
        channels_last=args.channels_last,
    )
    rows = []
    for shape in args.shapes:
        rows += op_bench.benchmark_op(
            shape,
            args.kernel_size,
            args.stride,
            args.group_channels,
            dtype,
            device,
            args.backends,  # None: every backend that runs on the device
            args.baselines,
            args.passes,
            args.warmup,
            args.repeats,
            args.copy_mib << 20 if args.copy_mib > 0 else None,
            args.channels_last,
        )
    chart = {
        "value": "median_ms",
        "category": "shape",
        "series": "op",
        "panel": "pass",
        "log": True,
    }
    return rows, metadata, chart


def _run_model(args: argparse.Namespace, device: torch.device) -> tuple[list, dict, dict]:
    from involution.models import create_model
    from involution.models._builder import check_model_kwargs

    kwargs = parse_model_args(args.model_arg)
    for name in args.models:
        check_model_kwargs(name, kwargs)  # a typo in the last name fails before any timing
    metadata: dict[str, object] = environment(device)
    metadata.update(
        batch_size=args.batch_size,
        image_size=args.image_size,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
    )
    rows = []
    for name in args.models:
        model = create_model(name, **kwargs)
        row = {"model": name}
        row.update(
            model_bench.benchmark_model(
                model,
                args.batch_size,
                args.image_size,
                int(kwargs.get("in_chans", 3)),
                device,
                args.amp,
                args.channels_last,
                args.compile,
                args.modes,
                args.warmup,
                args.repeats,
            )
        )
        rows.append(row)
    # One panel per throughput column, in the long form that bar_chart reads.
    long = [
        {"model": row["model"], "metric": f"{mode} images/s", "value": row[f"{mode}_img_s"]}
        for row in rows
        for mode in args.modes
    ]
    chart = {
        "rows": long,
        "value": "value",
        "category": "model",
        "panel": "metric",
        "ylabel": "images/s",
    }
    return rows, metadata, chart


def _run_onnx(args: argparse.Namespace, device: torch.device) -> tuple[list, dict, dict]:
    from involution.models import create_model

    if device.type != "cpu":
        raise ValueError(f"--device ({args.device}) must be cpu: onnxruntime runs on the CPU here")
    metadata: dict[str, object] = environment(device)
    metadata.update(image_size=args.image_size, runtime="onnxruntime " + _onnxruntime_version())
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            model = create_model(name)
            for row in model_bench.benchmark_onnxruntime(
                model,
                Path(folder) / f"{name}.onnx",
                args.batch_sizes,
                args.image_size,
                input_channels(model),
                args.threads,
                args.warmup,
                args.repeats,
            ):
                rows.append({"model": name, **row})
    baseline = {r["batch"]: r["median_ms"] for r in rows if r["model"] == args.baseline}
    if baseline:
        for row in rows:
            row[f"vs_{args.baseline}"] = row["median_ms"] / baseline[row["batch"]]
    chart = {"value": "median_ms", "category": "model", "panel": "batch", "ylabel": "ms per call"}
    return rows, metadata, chart


def _onnxruntime_version() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "(not installed)"
    return str(onnxruntime.__version__)


def run(args: argparse.Namespace) -> int:
    # torch.profiler (CPU peak memory) logs each start and stop at kineto's top level otherwise.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    try:
        device = setup_device(args)
        steady = args.target in ("op", "model")  # torch's own calls, timed as training makes them
        with keep_freed_memory(device) if steady else contextlib.nullcontext(None) as kept:
            rows, metadata, chart = args._bench(args, device)
        if kept is not None:
            metadata["freed_memory_kept"] = kept
        metadata["command"] = shlex.join(["involution", *sys.argv[1:]])
        text = format_rows(rows, args.format, metadata)
        if args.output is None:
            print(text)
        else:
            args.output.write_text(text + "\n", encoding="utf-8")
            print(f"wrote {args.output}")
        if args.plot is not None:
            chart_rows = chart.pop("rows", rows)
            print(f"wrote {bar_chart(chart_rows, args.plot, **chart)}")
    except EXPECTED_ERRORS as error:
        if getattr(args, "verbose", False):
            raise
        return fail(f"bench {args.target}", error)
    return 0

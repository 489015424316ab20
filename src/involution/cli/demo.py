"""Train a small RedNet and its ResNet baseline on embedded digits, on the CPU (no arguments).

The project's main job, without data or network: scikit-learn's handwritten digits (1,797 8x8
images, upsampled to 32x32, fixed stratified 75/25 split) train rednet26_cifar and
resnet26_cifar (same skeleton, involution vs 3x3 convolution; base_width=16), both in
channels_last, the faster memory format on the CPU for both. It prints a table of parameters,
multiply-adds, test accuracy and training time, and writes training curves (curves.png), the
first involution layer's kernels at a few pixels of a test image (kernels.png), results.json and
each run's outputs to --output-dir (default runs/demo). A demo run replaces the outputs of the
previous one in that folder.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MODELS = ("rednet26_cifar", "resnet26_cifar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of ``involution demo`` (all optional)."""
    parser.add_argument("--output-dir", default="runs/demo", help="default: runs/demo")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per model (default 8)")
    parser.add_argument("--base-width", type=int, default=16, help="model width (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the demo's results."""
    header = "| model | params | MACs (32x32) | test top-1 | train time |"
    lines = [header, "|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['params']:,} | {row['macs'] / 1e6:.1f} M | "
            f"{row['top1'] * 100:.1f} % | {row['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Runs ``involution demo``; returns the exit code."""

    from involution.models import count_macs
    from involution.training import TrainConfig, fit, load_data
    from involution.training.metrics_log import write_json
    from involution.training.plots import plot_history

    start = time.perf_counter()
    out = Path(args.output_dir)
    rows: list[dict[str, Any]] = []
    histories = {}
    kernel_model = None
    for name in MODELS:
        print(f"training {name} on digits for {args.epochs} epochs ...", flush=True)
        config = TrainConfig(
            model=name,
            data="digits",
            output_dir=str(out / name),
            model_kwargs={"base_width": args.base_width},
            epochs=args.epochs,
            batch_size=32,
            lr=0.1,
            warmup_epochs=min(0.5, args.epochs / 10),
            seed=args.seed,
            device="cpu",
            tensorboard=False,
            plots=False,
            overwrite=True,  # the demo is rerun as it is: it replaces its previous outputs
            # Both models train faster on the CPU in channels_last (oneDNN's convolutions and
            # the involution kernels read a pixel's channels as one vector): 169 s against 237 s
            # for the whole demo in one run (BENCHMARKS.md).
            channels_last=True,
        )
        result = fit(config)
        model = result.model
        rows.append(
            {
                "model": name,
                "params": sum(p.numel() for p in model.parameters()),
                "macs": count_macs(model, input_size=(1, 1, 32, 32)),
                "top1": result.final.top1,
                "train_seconds": result.seconds,
            }
        )
        histories[name] = result.history
        if kernel_model is None:
            kernel_model = model
    table = format_table(rows)
    print()
    print(table)
    plot_history(histories, out / "curves.png")
    test = load_data("digits").test
    if kernel_model is not None:
        _plot_demo_kernels(kernel_model, test[0][0], out / "kernels.png")
    write_json(
        {"rows": rows, "table": table, "wall_seconds": time.perf_counter() - start},
        out / "results.json",
    )
    print(
        f"\nwrote {out / 'curves.png'}, {out / 'kernels.png'} and {out / 'results.json'} "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return 0


def _plot_demo_kernels(model: torch.nn.Module, image: torch.Tensor, path: Path) -> None:
    """The first involution layer's kernels at a few pixels of one test digit (cf. Fig. 2)."""
    from involution.visualization import capture_kernel, involution_layers, plot_kernels

    model.eval()
    name, layer = next(iter(involution_layers(model).items()))
    kernel = capture_kernel(model, name, image.unsqueeze(0))
    gray = image.float().mean(0)
    picture = (
        ((gray - gray.min()) / (gray.max() - gray.min() + 1e-12)).unsqueeze(-1).repeat(1, 1, 3)
    )
    size = picture.shape[0]
    pixels = [(size // 4, size // 4), (size // 2, size // 2), (3 * size // 4, size // 2)]
    groups = list(range(min(layer.groups, 2)))
    plot_kernels(picture, kernel, layer.kernel_size, pixels, groups, path, title=f"{name} (demo)")

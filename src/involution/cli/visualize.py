"""Draw the involution kernels a model generates for an image (cf. Fig. 2 of the paper).

The PNG shows, for one involution layer: the image with the chosen pixels numbered; per group, a
map over the image of a statistic of each pixel's K x K kernel (default: the sum of its values);
and, per chosen pixel, the K x K kernel of each group as a heat map (red positive, blue
negative, with its colour scale). Without --image, a sample image that ships with the package
is used; without --weights the model is randomly initialized, so its kernels are untrained (a
warning says so). Examples:

  involution visualize --model rednet26 --weights rednet26.safetensors --list-layers
  involution visualize --model rednet26 --layer layer4.0.conv2 --pixels 60,100 150,40
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from involution.cli._options import (
    EXPECTED_ERRORS,
    add_model_arguments,
    build_model,
    fail,
    input_channels,
)
from involution.visualization import (
    STATISTICS,
    capture_kernel,
    involution_layers,
    load_image,
    plot_kernels,
    sample_image,
)


def _pixel(text: str) -> tuple[int, int]:
    row, sep, col = text.partition(",")
    if not sep or not row.strip().isdigit() or not col.strip().isdigit():
        raise argparse.ArgumentTypeError(f"pixel ({text!r}) must be ROW,COL, e.g. 112,80")
    return int(row), int(col)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--image", type=Path, help="any image Pillow reads (default: the packaged sample)"
    )
    parser.add_argument(
        "--layer", help="involution layer to show (default: the last one; see --list-layers)"
    )
    parser.add_argument(
        "--list-layers", action="store_true", help="print the involution layers and exit"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="the image is resized and center-cropped to this square (default: 224)",
    )
    parser.add_argument(
        "--pixels",
        nargs="+",
        type=_pixel,
        metavar="ROW,COL",
        help="image pixels whose kernels to draw (default: three across the image)",
    )
    parser.add_argument(
        "--groups",
        nargs="+",
        type=int,
        metavar="G",
        help="kernel groups to draw (default: the first 6)",
    )
    parser.add_argument(
        "--statistic",
        choices=STATISTICS,
        default="sum",
        help="per-pixel summary of a kernel for the maps (default: sum)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("kernels.png"),
        help="PNG to write (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        if args.image is not None and not args.image.is_file():
            raise FileNotFoundError(f"--image ({args.image}) is not a file")
        if args.image_size < 1:
            raise ValueError(f"--image-size ({args.image_size}) must be >= 1")
        model = build_model(args)
        layers = involution_layers(model)
        if args.list_layers:
            for name, module in layers.items():
                print(f"{name}: {type(module).__name__}({module.extra_repr()})")
            return 0
        if not layers:
            raise ValueError(f"the model ({type(model).__name__}) has no involution layer")
        layer = args.layer or list(layers)[-1]
        if args.weights is None:
            print(
                "involution visualize: warning: no --weights: the model is randomly "
                "initialized, so the kernels drawn are untrained",
                file=sys.stderr,
            )
        image_path = args.image or sample_image()
        images, picture = load_image(image_path, args.image_size, input_channels(model))
        kernel = capture_kernel(model, layer, images)
        size = args.image_size
        pixels = args.pixels or [
            (size // 2, size // 2),
            (size // 4, size // 4),
            (3 * size // 4, size // 3),
        ]
        groups = args.groups if args.groups is not None else list(range(min(6, kernel.shape[1])))
        kernel_size = layers[layer].kernel_size
        name = args.model or args.weights.stem
        shape = "x".join(map(str, kernel_size))
        title = f"{name} {layer}: {shape} kernels, image {image_path.name}"
        path = plot_kernels(
            picture, kernel, kernel_size, pixels, groups, args.output, args.statistic, title
        )
    except EXPECTED_ERRORS as error:
        if args.verbose:
            raise
        return fail("visualize", error)
    print(f"wrote {path} (layer {layer}, kernel {tuple(kernel.shape)})")
    return 0

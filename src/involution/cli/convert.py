"""Convert the authors' RedNet checkpoint (mmcls .pth) to a .safetensors file of this library.

The checkpoint is read with torch.load(weights_only=True); every key and shape is checked and
nothing is written when anything does not match. Load the result with
involution.models.load_weights(path) or create_model(name, pretrained=path).

Example:
    involution convert rednet50-1c7a7d5d.pth rednet50.safetensors
"""

from __future__ import annotations

import argparse
import sys

from involution.models import save_weights
from involution.models.convert import load_official_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="the authors' checkpoint (.pth)")
    parser.add_argument("output", help="the .safetensors file to write")
    parser.add_argument(
        "--model",
        default=None,
        help="model name, e.g. rednet50 (default: inferred from the checkpoint)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        model = load_official_checkpoint(args.checkpoint, name=args.model)
        save_weights(model, args.output)
    except (FileNotFoundError, ValueError) as err:
        print(f"involution convert: error: {err}", file=sys.stderr)
        return 1
    config = model.model_config
    params = sum(p.numel() for p in model.parameters())
    head = "features only" if config["features_only"] else f"{config['num_classes']} classes"
    print(f"{config['name']}: {params:,} parameters, {head} -> {args.output}")
    return 0

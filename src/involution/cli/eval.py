"""Evaluate weights on the test split of a data set: top-1, top-5, loss, images per second.

--weights takes a .safetensors file (``involution.models.save_weights``, e.g. the
model.safetensors that ``involution train`` writes) or a training checkpoint (last.pt). Both
name their model, so --model is needed only for a .safetensors file without a model config
(e.g. written by another tool); given anyway, it must name the weights' model. Top-5 is
reported only for data with more than 5 classes.

Example:
  involution eval --weights runs/train/model.safetensors --data digits
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from torch import nn

from involution.cli._options import build_model as build_model_from_args
from involution.cli._options import parse_model_args
from involution.cli.train import add_data_arguments, format_accuracy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of ``involution eval``."""
    parser.add_argument(
        "--model",
        help="a registered model name; optional, as the weights file names its model",
    )
    parser.add_argument(
        "--weights", required=True, type=Path, help=".safetensors weights or a last.pt"
    )
    add_data_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=256, help="default: 256")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--output", default=None, help="JSON file (default: next to --weights)")


def _model_from_checkpoint(args: argparse.Namespace) -> tuple[str, nn.Module]:
    """The model of a training checkpoint (last.pt), built with its saved options."""
    from involution.training import build_model
    from involution.training.checkpoint import load_checkpoint

    state = load_checkpoint(args.weights)
    saved = state["config"]
    if args.model is not None and saved["model"] != args.model:
        raise ValueError(
            f"--weights {str(args.weights)!r} holds a {saved['model']}, not --model {args.model}"
        )
    model = build_model(
        saved["model"],
        state["num_classes"],
        state["in_chans"],
        model_kwargs={**saved["model_kwargs"], **parse_model_args(args.model_arg)},
    )
    model.load_state_dict(state["model"])
    return saved["model"], model


def run(args: argparse.Namespace) -> int:
    """Runs ``involution eval``; returns the exit code."""
    import torch
    from torch.utils.data import DataLoader

    from involution.training import CheckpointError, check_model_fits_data, load_data
    from involution.training.config import AMP_DTYPES
    from involution.training.datasets import collate_skipping_corrupt, first_readable
    from involution.training.distributed import setup
    from involution.training.engine import evaluate
    from involution.training.metrics_log import write_json

    log = logging.getLogger(__name__)
    weights = args.weights
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size ({args.batch_size}) must be >= 1")
        if not weights.is_file():
            raise FileNotFoundError(f"--weights {str(weights)!r} does not exist")
        amp_dtype = AMP_DTYPES[args.amp]
        info = setup(args.device)
        if amp_dtype is torch.float16 and info.device.type != "cuda":
            raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
        data = load_data(
            args.data,
            args.data_dir,
            args.image_size,
            augment=False,
            download=args.download,
            download_url=args.download_url,
            download_md5=args.download_md5,
        )
        if weights.suffix == ".safetensors":
            model = build_model_from_args(args)
            name = model.model_config["name"]  # type: ignore[index]
        else:
            name, model = _model_from_checkpoint(args)
        model.to(info.device)
        sample = data.test[first_readable(data.test, f"the test set of --data {args.data}")][0]
        check_model_fits_data(model, sample, data.num_classes, f"--data {args.data}")
        workers = args.workers if args.workers is not None else (4 if args.data == "folder" else 0)
        loader = DataLoader(
            data.test,
            batch_size=args.batch_size,
            num_workers=workers,
            collate_fn=collate_skipping_corrupt,
        )
        result = evaluate(model, loader, info, amp_dtype, num_classes=data.num_classes)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        if args.verbose:
            raise
        log.error("%s", err)
        return 2
    metrics = {"model": name, "weights": str(weights), "data": args.data, **result.as_dict()}
    skipped = sorted({data.test.describe(i) for i in result.skipped})  # type: ignore[attr-defined]
    metrics["skipped_files"] = skipped
    output = Path(args.output) if args.output else weights.with_name(f"eval_{args.data}.json")
    write_json(metrics, output)
    print(
        f"{name} on {args.data} ({result.samples} images): {format_accuracy(result)}, "
        f"loss {result.loss:.4f}, {result.images_per_second:.1f} images/s; written to {output}"
    )
    if skipped:
        print(f"skipped {len(skipped)} unreadable image files:")
        for path in skipped[:20]:
            print(f"  {path}")
    return 0

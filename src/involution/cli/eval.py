"""Evaluate weights on the test split of a data set: top-1, top-5, loss, images per second.

--weights takes a .safetensors file (``involution.models.save_weights``, e.g. the
model.safetensors that ``involution train`` writes) or a training checkpoint (last.pt).

Example:
  involution eval --model rednet26_cifar --weights runs/train/model.safetensors --data digits \\
      --model-arg base_width=16
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from involution.cli._options import parse_model_args
from involution.cli.train import add_data_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of ``involution eval``."""
    parser.add_argument("--model", required=True, help="a registered model name")
    parser.add_argument("--weights", required=True, help=".safetensors weights or a last.pt")
    add_data_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=256, help="default: 256")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--output", default=None, help="JSON file (default: next to --weights)")


def run(args: argparse.Namespace) -> int:
    """Runs ``involution eval``; returns the exit code."""
    import torch
    from torch.utils.data import DataLoader

    from involution.training import CheckpointError, build_model, check_num_classes, load_data
    from involution.training.checkpoint import load_checkpoint
    from involution.training.config import AMP_DTYPES
    from involution.training.datasets import collate_skipping_corrupt
    from involution.training.distributed import setup
    from involution.training.engine import evaluate
    from involution.training.metrics_log import write_json

    log = logging.getLogger(__name__)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size ({args.batch_size}) must be >= 1")
        weights = Path(args.weights)
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
        kwargs = parse_model_args(args.model_arg)
        if weights.suffix == ".safetensors":
            from involution.models import load_weights

            model = load_weights(str(weights))
            saved_name = getattr(model, "model_config", {}).get("name", args.model)
            if saved_name != args.model:
                raise ValueError(
                    f"--weights {str(weights)!r} holds a {saved_name}, not --model {args.model}"
                )
        else:
            state = load_checkpoint(weights)
            saved = state["config"]
            if saved["model"] != args.model:
                raise ValueError(
                    f"--weights {str(weights)!r} holds a {saved['model']}, not --model {args.model}"
                )
            model = build_model(
                args.model,
                state["num_classes"],
                state["in_chans"],
                **{**saved["model_kwargs"], **kwargs},
            )
            model.load_state_dict(state["model"])
        model.to(info.device)
        check_num_classes(model, data.test[0][0], data.num_classes, f"--data {args.data}")
        workers = args.workers if args.workers is not None else (4 if args.data == "folder" else 0)
        loader = DataLoader(
            data.test,
            batch_size=args.batch_size,
            num_workers=workers,
            collate_fn=collate_skipping_corrupt,
        )
        result = evaluate(model, loader, info, amp_dtype, num_classes=data.num_classes)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        log.error("%s", err)
        return 2
    metrics = {"model": args.model, "weights": str(weights), "data": args.data, **result.as_dict()}
    skipped = sorted({data.test.describe(i) for i in result.skipped})  # type: ignore[attr-defined]
    metrics["skipped_files"] = skipped
    output = Path(args.output) if args.output else weights.with_name(f"eval_{args.data}.json")
    write_json(metrics, output)
    print(
        f"{args.model} on {args.data} ({result.samples} images): top-1 {result.top1:.4f}, "
        f"top-5 {result.top5:.4f}, loss {result.loss:.4f}, "
        f"{result.images_per_second:.1f} images/s; written to {output}"
    )
    if skipped:
        print(f"skipped {len(skipped)} unreadable image files:")
        for path in skipped[:20]:
            print(f"  {path}")
    return 0

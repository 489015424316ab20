"""Train a model of the zoo on digits, CIFAR-10/100 or an image folder.

Defaults follow the paper's recipe (Li et al., CVPR 2021): SGD with Nesterov momentum 0.9,
weight decay 1e-4, cosine schedule with linear warmup, label smoothing 0.1. --batch-size is the
global batch of one optimizer step, split over processes and --grad-accum micro-batches.

Examples:
  involution train --model rednet26_cifar --data digits --epochs 10 --model-arg base_width=16
  involution train --model rednet26_cifar --data cifar10 --data-dir data --download
  torchrun --nproc_per_node=2 -m involution train --model rednet50 --data folder --data-dir imagenet
  involution train ... --resume auto        # continue from <output-dir>/last.pt
  involution train --model rednet26 --data folder --data-dir pets --pretrained rednet26.safetensors \\
      --reset-classifier                      # fine-tune to another number of classes

Writes to --output-dir: last.pt (checkpoint, every epoch), metrics.csv, metrics.json,
curves.png, model.safetensors (final weights) and tensorboard/ when TensorBoard is installed.
A folder that holds a previous run (last.pt or model.safetensors) is never overwritten
silently: continue that run with --resume auto, or replace it with --overwrite.

Resuming restores the model, optimizer, schedule position, random states and history. Options
that differ from the checkpoint's run are reported: --epochs, --warmup-epochs rebuild the
learning-rate schedule for the new total from the saved step (so extending a finished cosine
run raises the learning rate again); --lr, --momentum, --weight-decay, --seed, --pretrained are
ignored (the saved optimizer, random states and weights win); the others apply from the next
epoch. --model, --model-arg, --data, --batch-size, --grad-accum and --optimizer cannot change.

A progress bar with an ETA shows each epoch when stderr is a terminal and tqdm is installed.
Top-5 accuracy is reported only for data with more than 5 classes.
"""

from __future__ import annotations

import argparse
import logging

from involution.cli._options import parse_model_args
from involution.training import CheckpointError, EvalResult, NonFiniteLossError, TrainConfig
from involution.training.config import AMP_DTYPES
from involution.training.datasets import DATA_KINDS
from involution.training.optim import OPTIMIZERS


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data options ``train`` and ``eval`` share."""
    parser.add_argument("--data", required=True, choices=DATA_KINDS, help="data set kind")
    parser.add_argument(
        "--data-dir",
        help="directory of the data (cifar: the extracted archive; folder: "
        "train/<class>/ and val/<class>/)",
    )
    parser.add_argument(
        "--image-size", type=int, default=224, help="crop size for folder data (default 224)"
    )
    parser.add_argument("--download", action="store_true", help="download a missing CIFAR archive")
    parser.add_argument("--download-url", help="a mirror of the official CIFAR archive (https)")
    parser.add_argument("--download-md5", help="the MD5 of the archive at --download-url")
    parser.add_argument(
        "--workers", type=int, help="DataLoader worker processes (default: 4 for folder, else 0)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument of the model builder, e.g. base_width=16 (repeatable)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of ``involution train``."""
    parser.add_argument(
        "--model",
        required=True,
        help="a registered model name, e.g. rednet26 (`involution list-models` lists them)",
    )
    add_data_arguments(parser)
    parser.add_argument("--output-dir", default="runs/train", help="default: runs/train")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous run in --output-dir: its last.pt, model.safetensors and "
        "metrics are deleted when training starts (without it, such a folder is refused)",
    )
    parser.add_argument("--pretrained", help="initial weights (.safetensors) to fine-tune")
    parser.add_argument(
        "--reset-classifier",
        action="store_true",
        help="with --pretrained: load every weight except the classifier, which starts afresh "
        "for the data's classes (fine-tuning to another number of classes)",
    )
    parser.add_argument("--epochs", type=int, default=100, help="default: 100")
    parser.add_argument(
        "--batch-size", type=int, default=128, help="global batch per optimizer step (default 128)"
    )
    parser.add_argument("--lr", type=float, help="learning rate (default: 0.1 x batch / 256)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="default: sgd")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="default: 1e-4")
    parser.add_argument(
        "--warmup-epochs", type=float, help="linear warmup (default: 5, at most epochs / 10)"
    )
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="default: 0.1")
    parser.add_argument(
        "--no-augment", dest="augment", action="store_false", help="no random augmentation"
    )
    parser.add_argument(
        "--amp",
        choices=tuple(AMP_DTYPES),
        default="none",
        help="mixed precision: bf16 (CPU or CUDA) or fp16 (CUDA)",
    )
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument(
        "--deterministic", action="store_true", help="deterministic algorithms only"
    )
    parser.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm (CUDA, torchrun)")
    parser.add_argument("--resume", metavar="PATH|auto", help="continue from a checkpoint")
    parser.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``train`` arguments."""
    return TrainConfig(
        model=args.model,
        data=args.data,
        data_dir=args.data_dir,
        output_dir=args.output_dir,
        model_kwargs=parse_model_args(args.model_arg),
        pretrained=args.pretrained,
        reset_classifier=args.reset_classifier,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        augment=args.augment,
        image_size=args.image_size,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        clip_grad=args.clip_grad,
        grad_accum=args.grad_accum,
        seed=args.seed,
        deterministic=args.deterministic,
        workers=args.workers,
        device=args.device,
        sync_bn=args.sync_bn,
        resume=args.resume,
        overwrite=args.overwrite,
        download=args.download,
        download_url=args.download_url,
        download_md5=args.download_md5,
        tensorboard=args.tensorboard,
    )


def format_accuracy(result: EvalResult) -> str:
    """``top-1 0.9000, top-5 0.9900``; top-5 only with more than 5 classes."""
    top5 = "" if result.top5 is None else f", top-5 {result.top5:.4f}"
    return f"top-1 {result.top1:.4f}{top5}"


def run(args: argparse.Namespace) -> int:
    """Runs ``involution train``; returns the exit code."""
    from involution.training import fit

    try:
        config = config_from_args(args)
        result = fit(config)
    except NonFiniteLossError as err:
        where = f"; the last good checkpoint is {err.checkpoint}" if err.checkpoint else ""
        logging.getLogger(__name__).error("%s%s", err, where)
        return 1
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        if args.verbose:
            raise
        logging.getLogger(__name__).error("%s", err)
        return 2
    if result.output_dir and result.history:
        print(
            f"{config.model} on {config.data}: {format_accuracy(result.final)}, "
            f"loss {result.final.loss:.4f} after {len(result.history)} epochs; "
            f"outputs in {result.output_dir}"
        )
    if result.skipped_files:
        print(f"skipped {len(result.skipped_files)} unreadable image files:")
        for path in result.skipped_files[:20]:
            print(f"  {path}")
    return 0

"""A whole training run: data, model, optimizer, the epoch loop, checkpoints and reports.

:func:`fit` is what ``involution train`` runs, on one process or under ``torchrun``. Per epoch
it trains, evaluates on the test set, appends a row to the history, writes ``metrics.csv`` and
then the checkpoint ``last.pt`` (atomically; rank 0 only). At the end it writes the weights
(``model.safetensors``), ``metrics.json`` and ``curves.png`` to the output directory.

A previous run's outputs are never replaced silently: a run writes into a folder holding
``last.pt`` or ``model.safetensors`` only when it continues that folder's checkpoint
(``resume="auto"`` or its path), or with ``overwrite=True``, which deletes them first.

Resuming restores the model, optimizer, schedule position, random states and history. Options
that differ from the checkpoint's run are reported by a warning, in three kinds: ``epochs``,
``warmup_epochs`` and ``warmup_start`` rebuild the learning-rate schedule for the new values at
the saved step (extending a finished run raises the learning rate again); ``lr``, ``momentum``,
``weight_decay``, ``seed``, ``pretrained`` and ``reset_classifier`` are ignored (the optimizer,
random states and weights come from the checkpoint); the others (label smoothing, clipping,
precision, augmentation ...) apply from the next epoch. ``model``, ``model_kwargs``, ``data``,
``batch_size``, ``grad_accum`` and ``optimizer`` must not change.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .checkpoint import (
    CHECKPOINT_NAME,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .config import AMP_DTYPES, TrainConfig
from .datasets import DataSets, collate_skipping_corrupt, first_readable, load_data
from .distributed import DistInfo, broadcast_buffers, setup, teardown
from .engine import EvalResult, NonFiniteLossError, evaluate, train_one_epoch
from .memory import keep_freed_memory
from .metrics_log import MetricsLogger, write_json
from .optim import build_optimizer, build_scheduler

__all__ = [
    "WEIGHTS_NAME",
    "FitResult",
    "build_model",
    "check_model_fits_data",
    "fit",
    "seed_everything",
]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
# What a run writes into its folder; --overwrite deletes these first.
_OUTPUTS = (CHECKPOINT_NAME, WEIGHTS_NAME, "metrics.csv", "metrics.json", "curves.png")
# Options whose change on resume rebuilds the schedule, or is ignored (see the module docstring).
_SCHEDULE_OPTIONS = ("epochs", "warmup_epochs", "warmup_start")
_IGNORED_ON_RESUME = ("lr", "momentum", "weight_decay", "seed", "pretrained", "reset_classifier")
_FIXED_ON_RESUME = ("model", "model_kwargs", "data", "batch_size", "grad_accum", "optimizer")
# Options that do not change how the run trains.
_UNTRACKED = (
    "resume", "output_dir", "data_dir", "workers", "device", "download", "overwrite", "plots",
    "tensorboard",
)  # fmt: skip


@dataclass
class FitResult:
    """What a finished run returns (on every rank)."""

    model: nn.Module
    history: list[dict[str, float]]
    final: EvalResult
    output_dir: Path
    seconds: float
    skipped_files: list[str] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(
    name: str,
    num_classes: int,
    in_chans: int,
    pretrained: str | None = None,
    reset_classifier: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A model of the zoo by name, for ``num_classes`` outputs and ``in_chans`` input channels.

    Args:
        name, num_classes, in_chans: as :func:`involution.create_model`'s.
        pretrained: a ``.safetensors`` file of initial weights, loaded strictly.
        reset_classifier: load every weight of ``pretrained`` except the classifier's (``fc``
            in every model of the zoo), which stays freshly initialized for ``num_classes``
            (fine-tuning to new classes).
        model_kwargs: the builder's other arguments (``--model-arg``).

    Raises:
        ValueError: an unknown model or builder argument, or weights that do not fit the model
            (a classifier for another number of classes without ``reset_classifier``).
    """
    from ..models import create_model
    from ..models._builder import HEAD_PREFIX, load_pretrained
    from ..models.weights import read_weights
    from .config import check_model_kwargs

    kwargs = dict(model_kwargs or {})
    check_model_kwargs(name, kwargs)
    model = create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if pretrained is None:
        return model
    state_dict, config = read_weights(pretrained)
    head = state_dict.get(f"{HEAD_PREFIX}weight")
    if reset_classifier:
        fresh = {k: v for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIX)}
        body = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIX)}
        state_dict = {**body, **fresh}
        logger.info(
            "--reset-classifier: loaded every weight of %s except the classifier (%s), "
            "which is new for %d classes",
            pretrained,
            "absent" if head is None else f"{head.shape[0]} classes in the file",
            num_classes,
        )
    elif head is not None and head.shape[0] != num_classes:
        raise ValueError(
            f"--pretrained ({pretrained}) has a classifier for {head.shape[0]} classes but the "
            f"data has {num_classes}; pass --reset-classifier to load every weight except the "
            "classifier and train a new one"
        )
    load_pretrained(model, state_dict, config, repr(pretrained))
    return model


def _input_channels(model: nn.Module) -> int | None:
    config = getattr(model, "model_config", None)
    if isinstance(config, dict) and "in_chans" in config:
        return int(config["in_chans"])
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first is None else first.in_channels


def check_model_fits_data(
    model: nn.Module, sample: torch.Tensor, num_classes: int, what: str
) -> None:
    """Checks that ``model`` takes the data's images and predicts its classes.

    The input channels are compared first (a mismatch would fail inside a convolution), then
    one sample runs through the model to count its outputs.

    Raises:
        ValueError: the model's input channels or output width differ from the data set's.
    """
    channels = _input_channels(model)
    if channels is not None and channels != sample.shape[0]:
        raise ValueError(
            f"the model takes {channels}-channel images but {what} has {sample.shape[0]}-channel "
            "images; use weights trained for this kind of image"
        )
    was_training = model.training
    model.eval()
    with torch.no_grad():
        outputs = model(sample.unsqueeze(0).to(next(model.parameters()).device)).shape[-1]
    model.train(was_training)
    if outputs != num_classes:
        raise ValueError(
            f"the model outputs {outputs} classes but {what} has {num_classes} classes; "
            "use weights trained for this data set"
        )


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, DistributedDataParallel) else model


def _loaders(
    config: TrainConfig, data: DataSets, info: DistInfo, micro_batch: int
) -> tuple[DataLoader, DistributedSampler, DataLoader]:
    workers = config.workers
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if config.data == "folder" else 0
    sampler: DistributedSampler = DistributedSampler(
        data.train, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=config.seed
    )
    common: dict[str, Any] = {
        "num_workers": workers,
        "collate_fn": collate_skipping_corrupt,
        "pin_memory": info.device.type == "cuda",
    }
    train = DataLoader(data.train, batch_size=micro_batch, sampler=sampler, **common)
    # Each rank evaluates its own shard, without the padding a DistributedSampler adds.
    shard: Dataset = Subset(data.test, range(info.rank, len(data.test), info.world_size))  # type: ignore[arg-type]
    test = DataLoader(shard, batch_size=micro_batch * 2, shuffle=False, **common)
    return train, sampler, test


def _gather_rng(info: DistInfo) -> list[dict[str, Any]]:
    state = capture_rng_state()
    if not info.enabled:
        return [state]
    # all_gather_object cannot carry tensors between CPU processes: send serialized bytes.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    blobs: list[Any] = [None] * info.world_size
    dist.all_gather_object(blobs, buffer.getvalue())
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in blobs]


def _changed_options(saved: dict[str, Any], config: TrainConfig, path: Path) -> list[str]:
    """The options of ``config`` that differ from the checkpoint's run (see the module docs).

    Raises:
        ValueError: an option that cannot change on resume did.
    """
    for key in _FIXED_ON_RESUME:
        if key in saved and saved[key] != getattr(config, key):
            raise ValueError(
                f"--resume {str(path)!r}: the checkpoint was trained with {key}="
                f"{saved[key]!r}, this run asks for {getattr(config, key)!r}"
            )
    return [
        key
        for key, value in config.as_dict().items()
        if key in saved and not key.startswith(_UNTRACKED) and saved[key] != value
    ]


def _report_changes(
    changed: list[str], saved: dict[str, Any], config: TrainConfig, step: int, lrs: tuple
) -> None:
    def describe(keys: list[str]) -> str:
        return ", ".join(f"{k} ({saved[k]!r} -> {getattr(config, k)!r})" for k in keys)

    schedule = [k for k in changed if k in _SCHEDULE_OPTIONS]
    ignored = [k for k in changed if k in _IGNORED_ON_RESUME]
    applied = [k for k in changed if k not in _SCHEDULE_OPTIONS + _IGNORED_ON_RESUME]
    if schedule:
        logger.warning(
            "--resume: %s changed: the learning-rate schedule is rebuilt for %d epochs from "
            "step %d, so the learning rate goes from %.4g (the saved run's) to %.4g",
            describe(schedule),
            config.epochs,
            step,
            *lrs,
        )
    if ignored:
        logger.warning(
            "--resume: %s ignored: the checkpoint's optimizer, random states and weights are "
            "restored as they were saved",
            describe(ignored),
        )
    if applied:
        logger.warning("--resume: %s changed: applied from here on", describe(applied))


def fit(config: TrainConfig) -> FitResult:
    """Trains ``config.model`` on ``config.data`` (see the module docstring).

    On the CPU this turns on ``torch.set_flush_denormal(True)`` for the process (speed), and
    where the allocator is glibc's, turns its trimming of freed memory off while it trains, so
    that each step reuses the memory of the one before; glibc's thresholds stay fixed for the
    rest of the process (see :func:`involution.training.memory.keep_freed_memory`).

    Raises:
        ValueError, FileNotFoundError: invalid options or data (raised before any training).
        CheckpointError: ``--resume`` names a corrupt or foreign checkpoint.
        NonFiniteLossError: the loss became NaN or infinite; the last good checkpoint is kept.
    """
    config.check()
    _check_output_dir(config)
    info = setup(config.device)
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        with keep_freed_memory(info.device):
            return _fit(config, info)
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        teardown()


def _resume_path(config: TrainConfig) -> Path | None:
    if config.resume == "auto":
        return find_checkpoint(Path(config.output_dir))
    return None if config.resume is None else Path(config.resume)


def _previous_outputs(output_dir: Path) -> list[str]:
    return [name for name in _OUTPUTS if (output_dir / name).exists()]


def _check_output_dir(config: TrainConfig) -> None:
    """Refuses an --output-dir that is a file, or that holds a run this one would replace."""
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir ({output_dir}) is an existing file; give a folder")
    resume = _resume_path(config)
    continues = resume is not None and resume.resolve() == (output_dir / CHECKPOINT_NAME).resolve()
    previous = [n for n in _previous_outputs(output_dir) if n in (CHECKPOINT_NAME, WEIGHTS_NAME)]
    if previous and not continues and not config.overwrite:
        raise ValueError(
            f"--output-dir ({output_dir}) holds a previous run ({', '.join(previous)}); pass "
            "--resume auto to continue it, --overwrite to replace it, or another --output-dir"
        )


def _fit(config: TrainConfig, info: DistInfo) -> FitResult:
    amp_dtype = AMP_DTYPES[config.amp]
    if amp_dtype is torch.float16 and info.device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    if config.sync_bn and info.device.type != "cuda":
        raise ValueError(
            "--sync-bn needs CUDA devices: PyTorch's SyncBatchNorm does not run on the CPU"
        )
    per_step = info.world_size * config.grad_accum
    if config.batch_size % per_step:
        raise ValueError(
            f"--batch-size ({config.batch_size}) must be divisible by processes x --grad-accum "
            f"({info.world_size} x {config.grad_accum})"
        )
    micro_batch = config.batch_size // per_step
    if info.device.type == "cpu":
        # Late in training tiny values become denormal floats, which x86 CPUs process 10-20x
        # slower (the demo's epochs slowed down several-fold); flushing them to zero avoids it.
        torch.set_flush_denormal(True)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    output_dir = Path(config.output_dir)
    seed_everything(config.seed)

    if info.is_main:
        data = load_data(
            config.data,
            config.data_dir,
            config.image_size,
            config.augment,
            config.download,
            config.download_url,
            config.download_md5,
        )
    if info.enabled:
        dist.barrier()  # rank 0 downloads alone
    if not info.is_main:
        data = load_data(config.data, config.data_dir, config.image_size, config.augment)

    first_readable(data.train, f"the training set of --data {config.data}")
    sample = data.test[first_readable(data.test, f"the test set of --data {config.data}")][0]
    model = build_model(
        config.model,
        data.num_classes,
        data.in_chans,
        config.pretrained,
        config.reset_classifier,
        config.model_kwargs,
    )
    check_model_fits_data(model, sample, data.num_classes, f"--data {config.data}")
    if config.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(info.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    train_loader, sampler, test_loader = _loaders(config, data, info, micro_batch)
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    optimizer = build_optimizer(
        model, config.optimizer, config.resolved_lr(), config.weight_decay, config.momentum
    )
    scheduler = build_scheduler(
        optimizer,
        total_steps,
        round(config.resolved_warmup_epochs() * steps_per_epoch),
        config.warmup_start,
    )
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp_dtype is torch.float16)

    start_epoch, step = 0, 0
    history: list[dict[str, float]] = []
    resume_path = _resume_path(config)
    if config.resume == "auto" and resume_path is None:
        logger.info("--resume auto: no checkpoint in %s; starting from scratch", output_dir)
    rng_to_restore = None
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        changed = _changed_options(state["config"], config, resume_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        saved_lr = optimizer.param_groups[0]["lr"]
        if any(key in _SCHEDULE_OPTIONS for key in changed):
            # The rebuilt schedule sets the learning rate from the first resumed step on.
            for group, base, factor in zip(
                optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
            ):
                group["lr"] = base * factor(scheduler.last_epoch)
        _report_changes(
            changed,
            state["config"],
            config,
            state["step"],
            (saved_lr, optimizer.param_groups[0]["lr"]),
        )
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, step, history = state["epoch"], state["step"], list(state["history"])
        rngs = state["rng"]
        if len(rngs) != info.world_size:
            logger.warning(
                "checkpoint saved by %d processes, resumed on %d: random streams differ",
                len(rngs),
                info.world_size,
            )
        rng_to_restore = rngs[min(info.rank, len(rngs) - 1)]
        logger.info("resumed from %s after epoch %d (step %d)", resume_path, start_epoch, step)
    else:
        # The model is initialized identically everywhere; augmentation streams differ per rank.
        seed_everything(config.seed + info.rank)

    train_model: nn.Module = model
    if info.enabled:
        train_model = DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
        )
    if config.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]

    if info.is_main and config.overwrite and resume_path is None:
        removed = _previous_outputs(output_dir)
        for name in removed:
            (output_dir / name).unlink()
        if removed:
            logger.warning("--overwrite: deleted the previous run's %s", ", ".join(removed))
    metrics = MetricsLogger(output_dir, config.tensorboard) if info.is_main else None
    checkpoint_path = output_dir / CHECKPOINT_NAME
    skipped: set[int] = set()
    final: EvalResult | None = None
    seconds = sum(row["epoch_seconds"] for row in history)
    if rng_to_restore is not None:
        restore_rng_state(rng_to_restore)
    if start_epoch >= config.epochs:
        final = evaluate(train_model, test_loader, info, amp_dtype, config.channels_last)
    try:
        for epoch in range(start_epoch, config.epochs):
            sampler.set_epoch(epoch)
            result = train_one_epoch(
                train_model,
                train_loader,
                optimizer,
                scheduler,
                scaler,
                info,
                epoch,
                step,
                config.label_smoothing,
                amp_dtype,
                config.grad_accum,
                config.clip_grad,
                config.channels_last,
            )
            step += result.steps
            skipped.update(result.skipped)
            broadcast_buffers(model, info)
            final = evaluate(
                train_model, test_loader, info, amp_dtype, config.channels_last, data.num_classes
            )
            seconds += result.seconds
            row = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": result.loss,
                "train_acc": result.accuracy,
                "test_loss": final.loss,
                "test_top1": final.top1,
                # Top-5 only means something with more than 5 classes.
                **({} if final.top5 is None else {"test_top5": final.top5}),
                "lr": result.lr,
                "epoch_seconds": result.seconds,
            }
            history.append(row)
            if info.is_main:
                logger.info(
                    "epoch %d/%d  train loss %.4f acc %.4f | test loss %.4f top1 %.4f | "
                    "lr %.3g | %.1f s",
                    epoch + 1,
                    config.epochs,
                    result.loss,
                    result.accuracy,
                    final.loss,
                    final.top1,
                    result.lr,
                    result.seconds,
                )
            rng = _gather_rng(info)
            if info.is_main:
                assert metrics is not None
                metrics.log_epoch(history)
                save_checkpoint(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                        "epoch": epoch + 1,
                        "step": step,
                        "rng": rng,
                        "config": config.as_dict(),
                        "num_classes": data.num_classes,
                        "in_chans": data.in_chans,
                        "history": history,
                    },
                    checkpoint_path,
                )
    except NonFiniteLossError as err:
        err.checkpoint = find_checkpoint(output_dir) if info.is_main else None
        raise
    finally:
        if metrics is not None:
            metrics.close()
    assert final is not None
    skipped_files = sorted({data.train.describe(i) for i in skipped})  # type: ignore[attr-defined]
    skipped_files += sorted({data.test.describe(i) for i in final.skipped})  # type: ignore[attr-defined]
    if skipped_files:
        logger.warning(
            "skipped %d unreadable image files, e.g. %s", len(skipped_files), skipped_files[:5]
        )
    if info.is_main:
        from ..models import save_weights

        save_weights(model, output_dir / WEIGHTS_NAME)
        write_json(
            {
                "model": config.model,
                "data": config.data,
                "epochs": len(history),
                "steps": step,
                "train_seconds": seconds,
                "test": final.as_dict(),
                "skipped_files": skipped_files,
                "config": config.as_dict(),
            },
            output_dir / "metrics.json",
        )
        if config.plots and history:
            from .plots import plot_history

            plot_history({config.model: history}, output_dir / "curves.png")
    return FitResult(model, history, final, output_dir, seconds, skipped_files)

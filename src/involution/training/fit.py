"""A whole training run: data, model, optimizer, the epoch loop, checkpoints and reports.

:func:`fit` is what ``involution train`` runs, on one process or under ``torchrun``. Per epoch
it trains, evaluates on the test set, appends a row to the history, writes ``metrics.csv`` and
then the checkpoint ``last.pt`` (atomically; rank 0 only). At the end it writes the weights
(``model.safetensors``), ``metrics.json`` and ``curves.png`` to the output directory.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
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
from .datasets import DataSets, collate_skipping_corrupt, load_data
from .distributed import DistInfo, broadcast_buffers, setup, teardown
from .engine import EvalResult, NonFiniteLossError, evaluate, train_one_epoch
from .metrics_log import MetricsLogger, write_json
from .optim import build_optimizer, build_scheduler

__all__ = ["FitResult", "build_model", "check_num_classes", "fit", "seed_everything"]

logger = logging.getLogger(__name__)


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
    **kwargs: Any,
) -> nn.Module:
    """A model of the zoo by name, for ``num_classes`` outputs and ``in_chans`` input channels.

    Raises:
        ValueError: ``name`` is not a registered model.
    """
    from ..models import create_model, list_models

    names = list_models()
    if name not in names:
        raise ValueError(f"--model ({name!r}) is not a registered model; choose one of {names}")
    return create_model(
        name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
    )


def check_num_classes(model: nn.Module, sample: torch.Tensor, num_classes: int, what: str) -> None:
    """Runs one sample through ``model`` and checks its number of outputs.

    Raises:
        ValueError: the model's output width differs from the data set's number of classes.
    """
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


def _check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    for key in ("model", "model_kwargs", "data", "batch_size", "grad_accum"):
        if saved.get(key) != getattr(config, key):
            raise ValueError(
                f"--resume {str(path)!r}: the checkpoint was trained with {key}="
                f"{saved.get(key)!r}, this run asks for {getattr(config, key)!r}"
            )
    ignored = ("resume", "output_dir", "data_dir", "workers", "device", "download")
    changed = [
        key
        for key, value in config.as_dict().items()
        if key in saved and not key.startswith(ignored) and saved[key] != value
    ]
    if changed:
        logger.warning(
            "--resume: %s differ from the checkpoint's run; the saved optimizer and schedule "
            "continue as they were",
            ", ".join(f"{k} ({saved[k]!r} -> {getattr(config, k)!r})" for k in changed),
        )


def fit(config: TrainConfig) -> FitResult:
    """Trains ``config.model`` on ``config.data`` (see the module docstring).

    On the CPU this turns on ``torch.set_flush_denormal(True)`` for the process (speed).

    Raises:
        ValueError, FileNotFoundError: invalid options or data (raised before any training).
        CheckpointError: ``--resume`` names a corrupt or foreign checkpoint.
        NonFiniteLossError: the loss became NaN or infinite; the last good checkpoint is kept.
    """
    config.check()
    info = setup(config.device)
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        return _fit(config, info)
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        teardown()


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

    model = build_model(
        config.model, data.num_classes, data.in_chans, config.pretrained, **config.model_kwargs
    )
    check_num_classes(model, data.test[0][0], data.num_classes, f"--data {config.data}")
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
    resume_path = None
    if config.resume == "auto":
        resume_path = find_checkpoint(output_dir)
        if resume_path is None:
            logger.info("--resume auto: no checkpoint in %s; starting from scratch", output_dir)
    elif config.resume is not None:
        resume_path = Path(config.resume)
    rng_to_restore = None
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        _check_resumable(state["config"], config, resume_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
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
                "test_top5": final.top5,
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

        save_weights(model, output_dir / "model.safetensors")
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

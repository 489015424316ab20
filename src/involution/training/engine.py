"""One training epoch and one evaluation pass: mixed precision, gradient clipping and
accumulation, skipped corrupt samples, and a stop on the first non-finite loss.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .distributed import DistInfo, all_ranks_true, all_reduce_sum

__all__ = ["EpochResult", "EvalResult", "NonFiniteLossError", "evaluate", "train_one_epoch"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops without saving that state."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(
            f"loss is {value} at epoch {epoch + 1}, optimizer step {step + 1}; training stopped "
            "(lower --lr, use --clip-grad, or check the data)"
        )
        self.epoch, self.step, self.value = epoch, step, value
        self.checkpoint: Path | None = None  # the last good checkpoint, set by fit()


@dataclass
class EpochResult:
    """Averages over the samples of one training epoch."""

    loss: float
    accuracy: float
    lr: float
    steps: int
    samples: int
    seconds: float
    skipped: list[int] = field(default_factory=list)


@dataclass
class EvalResult:
    """Metrics of one evaluation pass; ``top5`` is None with 5 classes or fewer (always 1)."""

    loss: float
    top1: float
    top5: float | None
    samples: int
    seconds: float
    images_per_second: float
    skipped: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, float | int | None]:
        """The metrics without the skipped indices, for JSON."""
        return {
            "loss": self.loss,
            "top1": self.top1,
            "top5": self.top5,
            "samples": self.samples,
            "seconds": self.seconds,
            "images_per_second": self.images_per_second,
            "skipped": len(self.skipped),
        }


def _progress(loader: Iterable, desc: str, show: bool) -> Iterable:
    """``loader`` with a progress bar and ETA on stderr, when stderr is a terminal.

    The bar goes where tqdm writes, stderr, so ``involution train ... | tee log`` keeps it on
    screen and ``2> log`` keeps it out of the log. Without tqdm the loop runs without a bar.
    """
    if not (show and sys.stderr.isatty()):
        return loader
    try:
        from tqdm import tqdm
    except ImportError:
        logger.debug("no progress bar: tqdm is not installed")
        return loader
    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr, unit="batch")


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    info: DistInfo,
    epoch: int,
    step: int,
    label_smoothing: float = 0.1,
    amp_dtype: torch.dtype | None = None,
    grad_accum: int = 1,
    clip_grad: float | None = None,
    channels_last: bool = False,
) -> EpochResult:
    """Trains ``model`` for one pass over ``loader``.

    Every ``grad_accum`` batches (and at the end of the epoch) the optimizer and the per-step
    scheduler take one step. Under DDP the gradients are synchronized only on those batches.

    Args:
        model: the model, possibly wrapped in DistributedDataParallel.
        loader: yields ``(images, labels, skipped_indices)``.
        optimizer, scheduler, scaler: stepped here; ``scaler`` is enabled only for fp16.
        info: the process's rank, world size and device.
        epoch: 0-based epoch, for messages.
        step: optimizer steps taken before this epoch, for messages.
        label_smoothing: of the cross-entropy loss.
        amp_dtype: autocast dtype, or None for full precision.
        grad_accum: batches per optimizer step.
        clip_grad: maximum global gradient norm, or None.
        channels_last: move each batch to the channels-last memory format.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (on any rank); the optimizer did
            not take that step.
    """
    model.train()
    device = info.device
    total_loss = torch.zeros((), dtype=torch.float64)
    total_correct = 0
    total_samples = 0
    skipped: list[int] = []
    n_batches = len(loader)  # type: ignore[arg-type]
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    steps = 0
    for i, (images, labels, bad) in enumerate(
        _progress(loader, f"epoch {epoch + 1}", info.is_main)
    ):
        skipped.extend(bad)
        if not all_ranks_true(images.shape[0] > 0, info):
            logger.warning("batch %d of epoch %d has no decodable image; skipped", i, epoch + 1)
            continue
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        last_of_group = (i + 1) % grad_accum == 0 or i + 1 == n_batches
        # DDP all-reduces gradients on the last micro-batch of each optimizer step only.
        context = (
            model.no_sync()
            if isinstance(model, DistributedDataParallel) and not last_of_group
            else contextlib.nullcontext()
        )
        with context:
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                logits = model(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
            if not all_ranks_true(bool(torch.isfinite(loss)), info):
                raise NonFiniteLossError(epoch, step + steps, float(loss.detach()))
            scaler.scale(loss / grad_accum).backward()
        total_loss += float(loss.detach()) * labels.shape[0]
        total_correct += int((logits.argmax(1) == labels).sum())
        total_samples += labels.shape[0]
        if last_of_group:
            if clip_grad is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
    sums = all_reduce_sum(
        torch.tensor([float(total_loss), total_correct, total_samples], dtype=torch.float64),
        info,
    )
    samples = int(sums[2])
    return EpochResult(
        loss=float(sums[0]) / max(samples, 1),
        accuracy=float(sums[1]) / max(samples, 1),
        lr=optimizer.param_groups[0]["lr"],
        steps=steps,
        samples=samples,
        seconds=time.perf_counter() - start,
        skipped=skipped,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    info: DistInfo,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    num_classes: int | None = None,
) -> EvalResult:
    """Top-1, top-5 (None with 5 classes or fewer), mean cross-entropy and throughput.

    Under DDP each rank evaluates its own shard and the sums are all-reduced.
    """
    model.eval()
    device = info.device
    loss_sum = 0.0
    correct1 = correct5 = samples = 0
    classes = num_classes
    skipped: list[int] = []
    start = time.perf_counter()
    for images, labels, bad in _progress(loader, "eval", info.is_main):
        skipped.extend(bad)
        if images.shape[0] == 0:
            continue
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            logits = model(images).float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        classes = num_classes or logits.shape[1]
        top = logits.topk(min(5, classes), dim=1).indices
        hits = top == labels[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        samples += labels.shape[0]
    seconds = time.perf_counter() - start
    sums = all_reduce_sum(
        torch.tensor([loss_sum, correct1, correct5, samples], dtype=torch.float64), info
    )
    n = int(sums[3])
    if n == 0:
        raise ValueError("evaluation found no decodable image in the test set")
    loss = float(sums[0]) / n
    return EvalResult(
        loss=loss if math.isfinite(loss) else float("nan"),
        top1=float(sums[1]) / n,
        top5=float(sums[2]) / n if classes is not None and classes > 5 else None,
        samples=n,
        seconds=seconds,
        images_per_second=n / seconds if seconds > 0 else float("inf"),
        skipped=skipped,
    )

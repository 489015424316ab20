"""Models side by side: parameters, multiply-adds, images per second and peak memory.

Inference is a forward pass in eval mode without autograd; training is one optimizer step
(forward in train mode, cross-entropy on random labels, backward, SGD update). Inputs are random
images, the same for every model.

:func:`benchmark_onnxruntime` measures deployment instead: the model exported to ONNX (as
``involution export`` does) and run by onnxruntime's CPU provider.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .memory import peak_memory
from .timing import measure_time

__all__ = ["MODES", "benchmark_model", "benchmark_onnxruntime"]

logger = logging.getLogger(__name__)

MODES = ("inference", "training")
_MiB = 1 << 20


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    # bfloat16 has float32's range, so training needs no gradient scaler on any device.
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def benchmark_model(
    model: nn.Module,
    batch_size: int = 32,
    image_size: int = 224,
    in_chans: int = 3,
    device: torch.device | str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    modes: Sequence[str] = MODES,
    warmup: int = 2,
    repeats: int = 10,
) -> dict[str, object]:
    """Measures one image classifier.

    Args:
        model: takes (B, C, H, W) images and returns (B, classes) logits; it is moved to
            ``device`` and its weights change in the training measurement.
        batch_size: images per step.
        image_size: height and width of the images.
        in_chans: channels of the images.
        device: where to run.
        amp: run under ``torch.autocast`` in bfloat16.
        channels_last: model and images in channels-last memory format.
        compile: wrap the model in ``torch.compile`` (compilation happens during warm-up).
        modes: a subset of ``MODES``.
        warmup, repeats: as in :func:`involution.benchmark.measure_time`.

    Returns:
        ``params_m`` (millions), ``gmacs`` (multiply-adds per image, 1e9; from
        :func:`involution.models.count_macs`), and for each mode ``<mode>_img_s`` (images per
        second at the median step time) and ``<mode>_peak_mib`` (peak memory of one step
        above what was live before it).

    Raises:
        ValueError: a bad batch_size, image_size or mode.
    """
    from ..models import count_macs

    device = torch.device(device)
    if batch_size < 1:
        raise ValueError(f"batch_size ({batch_size}) must be >= 1")
    if image_size < 1:
        raise ValueError(f"image_size ({image_size}) must be >= 1")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"modes ({unknown}) must be among {MODES}")
    row: dict[str, object] = {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gmacs": count_macs(model.eval(), (1, in_chans, image_size, image_size)) / 1e9,
    }
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=memory_format)  # type: ignore[call-overload]
    images = torch.randn(batch_size, in_chans, image_size, image_size, device=device)
    images = images.contiguous(memory_format=memory_format)
    runner: Callable[[torch.Tensor], torch.Tensor] = torch.compile(model) if compile else model

    def inference() -> object:
        with torch.inference_mode(), _autocast(device, amp):
            return runner(images)

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    labels: torch.Tensor | None = None

    def training() -> object:
        nonlocal labels
        with _autocast(device, amp):
            logits = runner(images)
            if labels is None:
                labels = torch.randint(logits.shape[1], (batch_size,), device=device)
            loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        # Gradients are freed within the step, so that each step starts from the same memory.
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for mode, step in (("inference", inference), ("training", training)):
        if mode not in modes:
            continue
        model.train(mode == "training")
        logger.info("measuring %s of %s", mode, type(model).__name__)
        timing = measure_time(step, device, max(warmup, 1), repeats)
        row[f"{mode}_img_s"] = batch_size / timing.median
        row[f"{mode}_peak_mib"] = peak_memory(step, device) / _MiB
    return row


def benchmark_onnxruntime(
    model: nn.Module,
    path: str | os.PathLike[str],
    batch_sizes: Sequence[int] = (1, 8),
    image_size: int = 224,
    in_chans: int = 3,
    threads: int | None = None,
    warmup: int = 2,
    repeats: int = 10,
) -> list[dict[str, object]]:
    """Exports ``model`` to ONNX and times onnxruntime's CPU provider on random images.

    Args:
        model: takes (B, C, H, W) images; exported in eval mode with dynamic batch and size.
        path: the ONNX file to write.
        batch_sizes: images per call, one row each.
        image_size: height and width of the images.
        in_chans: channels of the images.
        threads: onnxruntime's intra-op threads; None means ``os.cpu_count()``.
        warmup, repeats: as in :func:`involution.benchmark.measure_time`.

    Returns:
        One row per batch size: ``batch``, ``threads``, ``export_s`` (seconds to export),
        ``nodes`` (of the ONNX graph), ``median_ms``/``min_ms`` per call and ``img_s`` (images
        per second at the median).

    Raises:
        ValueError: a batch size, image size or thread count < 1.
        ImportError: onnxruntime, onnx or onnxscript is missing (``involution[export]``).
    """
    from ..export import INPUT_NAME, export_onnx, onnx_op_counts

    if image_size < 1 or any(b < 1 for b in batch_sizes):
        raise ValueError(
            f"image_size ({image_size}) and batch_sizes ({list(batch_sizes)}) must be >= 1"
        )
    if threads is None:
        threads = os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"threads ({threads}) must be >= 1")
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            "timing ONNX needs onnxruntime: pip install 'involution[export]'"
        ) from error
    model = model.eval()
    start = time.perf_counter()
    export_onnx(model, path, torch.randn(2, in_chans, image_size, image_size))
    export_s = time.perf_counter() - start
    nodes = sum(onnx_op_counts(path).values())
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rows: list[dict[str, object]] = []
    for batch in batch_sizes:
        feed = {INPUT_NAME: torch.randn(batch, in_chans, image_size, image_size).numpy()}
        logger.info("timing onnxruntime at batch %d", batch)
        timing = measure_time(functools.partial(session.run, None, feed), "cpu", warmup, repeats)
        rows.append(
            {
                "batch": batch,
                "threads": threads,
                "export_s": export_s,
                "nodes": nodes,
                "median_ms": timing.median * 1e3,
                "min_ms": timing.minimum * 1e3,
                "img_s": batch / timing.median,
            }
        )
    return rows

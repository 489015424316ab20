"""The paper's optimizer and learning-rate schedule (Li et al., CVPR 2021, Sec. 5.1).

SGD with Nesterov momentum 0.9 and weight decay 1e-4 (or AdamW), and a per-step schedule:
linear warmup from ``warmup_start * lr`` to ``lr``, then a cosine decay to 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["OPTIMIZERS", "build_optimizer", "build_scheduler", "warmup_cosine"]

OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW over the trainable parameters of ``model``.

    Both use torch's fused implementation (one kernel per parameter for the whole update) where
    every parameter is a floating-point tensor on the CPU or a CUDA device; on the CPU it takes
    the demo's SGD step from 1.65 to 0.32 ms (BENCHMARKS.md).

    Raises:
        ValueError: an unknown optimizer name or a non-positive learning rate.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer ({name!r}) must be one of {list(OPTIMIZERS)}")
    if not lr > 0:
        raise ValueError(f"--lr ({lr}) must be > 0")
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=momentum,
            nesterov=True,
            weight_decay=weight_decay,
            fused=fused,
        )
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, warmup_start: float) -> float:
    """The learning-rate factor at ``step`` (0-based) of ``total_steps``."""
    if step < warmup_steps:
        return warmup_start + (1 - warmup_start) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    warmup_start: float = 0.25,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step :func:`warmup_cosine` schedule.

    Raises:
        ValueError: ``warmup_steps`` is negative or not below ``total_steps``.
    """
    if not 0 <= warmup_steps < max(total_steps, 1):
        raise ValueError(
            f"warmup steps ({warmup_steps}) must lie in [0, total steps ({total_steps})): "
            "lower --warmup-epochs"
        )

    def factor(step: int) -> float:
        return warmup_cosine(step, total_steps, warmup_steps, warmup_start)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

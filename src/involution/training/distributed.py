"""Multi-process training through PyTorch's own runtime (``torchrun``).

``torchrun --nproc_per_node=N -m involution train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`setup` then joins the process group (NCCL on CUDA, gloo on CPU) and picks
this process's device. Without those variables everything here is a single-process no-op.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_ranks_true", "broadcast_buffers", "setup", "teardown"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the number of processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes logs and checkpoints."""
        return self.rank == 0


def setup(device: str | None = None) -> DistInfo:
    """Joins the process group when launched by torchrun; picks the device.

    Args:
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available). Under torchrun on CUDA,
            each process takes ``cuda:LOCAL_RANK``.

    Raises:
        ValueError: ``device`` is ``"cuda"`` and CUDA is not available.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend)
        logger.info("rank %d of %d joined the %s process group", rank, world_size, backend)
    return DistInfo(rank, world_size, local_rank, dev)


def teardown() -> None:
    """Leaves the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_ranks_true(flag: bool, info: DistInfo) -> bool:
    """True when ``flag`` holds on every rank (the flag itself without torchrun)."""
    if not info.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() == 1.0)


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``values`` over ranks (``values`` itself without torchrun)."""
    if info.enabled:
        values = values.to(info.device)
        dist.all_reduce(values)
    return values


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Copies rank 0's buffers (BatchNorm statistics) to every rank.

    DDP broadcasts them at the start of each forward, so after the last step of an epoch each
    rank holds its own statistics; this makes evaluation and checkpoints agree across ranks.
    """
    if info.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)

"""Wall-clock timing of a callable: warm-up, repeats, median.

On the CPU each call is timed with ``time.perf_counter``; on CUDA with a pair of CUDA events
around each call, so that the launch overhead of the host and asynchronous execution are both
accounted for. The median is reported because it ignores the occasional slow repeat caused by
other processes on a shared machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Timing", "measure_time", "synchronize"]


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``repeats`` timed calls."""

    median: float
    minimum: float
    maximum: float
    repeats: int


def synchronize(device: torch.device) -> None:
    """Waits for the work queued on ``device`` (a no-op on the CPU).

    Raises:
        ValueError: a device type other than cpu or cuda.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        raise ValueError(f"device ({device}) must be a cpu or cuda device for benchmarking")


def measure_time(
    fn: Callable[[], object],
    device: torch.device | str = "cpu",
    warmup: int = 2,
    repeats: int = 10,
) -> Timing:
    """Times ``fn()`` on ``device``.

    Args:
        fn: the work to time; its result is dropped after each call.
        device: where ``fn`` runs; decides the clock (see the module docstring).
        warmup: untimed calls first (allocator caches, lazy initialization, autotuning).
        repeats: timed calls.

    Returns:
        The median, minimum and maximum seconds per call.

    Raises:
        ValueError: ``warmup`` < 0, ``repeats`` < 1, or a device other than cpu or cuda.
    """
    device = torch.device(device)
    if warmup < 0:
        raise ValueError(f"warmup ({warmup}) must be >= 0")
    if repeats < 1:
        raise ValueError(f"repeats ({repeats}) must be >= 1")
    synchronize(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        seconds = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - begin)
    return Timing(statistics.median(seconds), min(seconds), max(seconds), repeats)

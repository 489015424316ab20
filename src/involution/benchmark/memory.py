"""Peak memory of a callable: the most bytes it holds at once beyond what was live before it.

On CUDA this is the caching allocator's own counter (``torch.cuda.max_memory_allocated``) minus
the bytes allocated before the call. The CPU has no such counter, so the call runs once under
``torch.profiler`` with ``profile_memory=True``: every allocation and free is then recorded with
its size and time, and the running sum of those events, in time order, is the live memory the
call added; its maximum is the peak. The result of the call is still held when the
measurement ends, so it counts toward the peak (as an output buffer must). The profiler sees
PyTorch's allocator only, so the call's CPU kernels take their large results from it as well
(``ops/cpu/results.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from ..ops.cpu import results
from .timing import synchronize

__all__ = ["peak_memory"]


def _cpu_peak(fn: Callable[[], object]) -> int:
    with (
        results.by_torch(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        result = fn()
    del result
    events = [
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    ]
    # A stable sort keeps the recorded order of events that share a timestamp.
    events.sort(key=lambda e: e[0])
    live = itertools.accumulate(nbytes for _, nbytes in events)
    return max(0, max(live, default=0))


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> int:
    synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return max(0, peak - baseline)


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes that one call of ``fn()`` allocates on ``device`` above the bytes live before.

    Run ``fn`` at least once beforehand (see :func:`involution.benchmark.measure_time`) so that
    one-time allocations, such as lazily built caches, are not counted.

    Args:
        fn: the work to measure.
        device: where ``fn`` allocates.

    Returns:
        Bytes; 0 when ``fn`` allocates nothing.

    Raises:
        ValueError: a device other than cpu or cuda.

    Example:
        >>> peak_memory(lambda: torch.empty(1024, dtype=torch.uint8))
        1024
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    if device.type != "cpu":
        raise ValueError(f"device ({device}) must be a cpu or cuda device for benchmarking")
    return _cpu_peak(fn)

"""Memory for the CPU kernels' large results: huge pages, and reuse while a training run lasts.

A result of :data:`LARGE_BYTES` or more (the kernel gradient at 8x256x56x56 is 75 MiB) gets an
anonymous mapping of its own, as glibc would give it, advised huge pages before its first touch:
the kernels then fault it in 2 MiB at a time instead of 4 KiB, which otherwise took as long as
the kernel gradient's own work (BENCHMARKS.md). The result starts on a 2 MiB boundary of its
mapping, so that all of it can be huge pages.

A mapping is still a fresh one at every call, zeroed by the system page by page: 12-16 ms of
system time per training step at that shape. Inside :func:`keep`, which
``training.memory.keep_freed_memory`` enters for a training run, the mapping of a freed result
is kept, and the next result that fits in it reuses it, already faulted in (the smallest that
fits, at most twice the result's size). The kept mappings are given back when the outermost
block ends, before a fork (DataLoader workers), and whenever a new mapping would make the kept
and live ones together more than the most that live ones have taken at once in the block:
results whose sizes change, as in multi-scale training, do not pile up.

Smaller results come from PyTorch's allocator as usual. Where Python has no huge-page advice
(not Linux), and inside :func:`by_torch` (the CPU's peak-memory measurement, which sees
PyTorch's allocations only), every result does.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import threading
import weakref
from collections.abc import Iterator, Sequence

import torch

__all__ = ["LARGE_BYTES", "by_torch", "empty", "keep", "kept_bytes"]

# Results from this size on get mappings of their own: glibc's largest threshold for the same.
LARGE_BYTES = 32 << 20
# The huge page of x86-64 and of 4 KiB-page arm64 (larger ones are simply not used).
_HUGE_PAGE = 1 << 21

# Reentrant: a result can be freed, and its mapping come back, in the middle of a locked
# section of the same thread (a garbage collection run by an allocation there).
_lock = threading.RLock()
_keeping = 0  # open keep() blocks
_kept: dict[int, list[mmap.mmap]] = {}  # freed mappings by size, oldest first, while _keeping
_live = 0  # bytes of the mappings of live results
_peak = 0  # the most _live has been in the current keep() block
_by_torch = 0  # open by_torch() blocks


def empty(shape: Sequence[int], stride: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor with this shape, stride and dtype (a dense layout)."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if nbytes < LARGE_BYTES or _by_torch or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty_strided(shape, stride, dtype=dtype, device="cpu")
    # One huge page more than needed, so that a 2 MiB boundary leaves room for the whole result.
    size = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE + _HUGE_PAGE
    region, given_back = _take(size)
    for old in given_back:
        old.close()
    if region is None:
        region = _new_mapping(size)
    # The tensor holds the view, and the view the mapping: the mapping comes back to _freed when
    # the last tensor on it is gone. The tensor's storage is the result's bytes alone (what
    # torch.save writes, or share_memory_() copies).
    view = memoryview(region)
    weakref.finalize(view, _freed, region).atexit = False
    start = -torch.frombuffer(view, dtype=torch.uint8, count=1).data_ptr() % _HUGE_PAGE
    flat = torch.frombuffer(view, dtype=dtype, count=numel, offset=start)
    return flat.as_strided(shape, stride)


def _new_mapping(size: int) -> mmap.mmap:
    """A new mapping of ``size`` bytes, advised huge pages, counted live."""
    # Private: Linux gives huge pages to private anonymous memory (shared is shmem's).
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # a hint: a kernel without huge pages refuses it
        region.madvise(mmap.MADV_HUGEPAGE)
    with _lock:
        _count_live(size)
    return region


def _count_live(size: int) -> None:
    """Counts ``size`` more bytes live (the caller holds the lock)."""
    global _live, _peak
    _live += size
    _peak = max(_peak, _live)


def _take(size: int) -> tuple[mmap.mmap | None, list[mmap.mmap]]:
    """The smallest kept mapping of ``size`` bytes or more (at most twice as many), counted
    live; or None where a new one is to be made, with the kept mappings to give back first so
    that kept and live ones together stay within the block's peak."""
    with _lock:
        fits = [n for n, regions in list(_kept.items()) if size <= n <= 2 * size and regions]
        if fits:
            region = _kept[min(fits)].pop()
            _count_live(len(region))
            return region, []
        live = _live + size
        kept = kept_bytes()
        given_back = []
        for regions in list(_kept.values()):
            while regions and kept + live > max(_peak, live):
                given_back.append(regions.pop(0))
                kept -= len(given_back[-1])
        return None, given_back


def _freed(region: mmap.mmap) -> None:
    global _live
    with _lock:
        _live -= len(region)
        if _keeping:
            _kept.setdefault(len(region), []).append(region)
            return
    region.close()


def _give_back_kept() -> None:
    """Unmaps every kept mapping: when the outermost block ends, and before a fork (DataLoader
    workers), since a child sharing them would make each of their pages copy-on-write in the
    parent, and split its huge pages."""
    with _lock:
        given_back = [r for rs in list(_kept.values()) for r in rs]
        _kept.clear()
    for region in given_back:
        region.close()


def _after_fork_in_child() -> None:
    """A child starts with a lock of its own (another thread may have held the parent's), keeps
    nothing, and allocates as outside any block."""
    global _lock, _keeping, _kept
    _lock, _keeping, _kept = threading.RLock(), 0, {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_give_back_kept, after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def keep() -> Iterator[None]:
    """Inside the block, the mappings of freed large results are kept for the next ones.

    Blocks nest: the kept mappings are given back when the outermost ends, even by an exception.
    Results still alive then give theirs back when they are freed.
    """
    global _keeping, _peak
    with _lock:
        if not _keeping:
            _peak = _live
        _keeping += 1
    try:
        yield
    finally:
        with _lock:
            _keeping -= 1
            if not _keeping:
                _give_back_kept()


def kept_bytes() -> int:
    """The bytes of freed results' mappings kept now."""
    with _lock:
        return sum(size * len(regions) for size, regions in list(_kept.items()))


@contextlib.contextmanager
def by_torch() -> Iterator[None]:
    """Inside the block, every result comes from PyTorch's allocator, the one that
    ``torch.profiler`` records (``benchmark/memory.py`` measures the CPU's peaks so)."""
    global _by_torch
    with _lock:
        _by_torch += 1
    try:
        yield
    finally:
        with _lock:
            _by_torch -= 1

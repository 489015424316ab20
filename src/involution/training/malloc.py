"""Keeping freed memory mapped while training on the CPU, where the C library is glibc.

glibc gives the free memory at the top of its heap back to the system once it exceeds a trim
threshold, which it keeps at twice the largest block it has handed out by ``mmap`` (at most
64 MiB). A training step frees its activations when it ends, far more than that, so each step
faults them in again, 4 KiB at a time, each page zeroed by the kernel. In the first model a
process trains (the demo's RedNet), that cost 1.1-1.5 million page faults and 4-6 s of system
time in 2-3 epochs (BENCHMARKS.md). :func:`keep_freed_memory` raises the trim threshold for the
duration of a run, so that the memory of one step is reused by the next, as the allocators that
PyTorch's CPU tuning guide suggests (jemalloc, tcmalloc) do.

Elsewhere (another C library, or glibc's ``mallopt`` refusing a value) it changes nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import platform
from collections.abc import Iterator

logger = logging.getLogger(__name__)

__all__ = ["keep_freed_memory"]

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks from this size on are mapped on their own, and unmapped when freed: glibc's largest
# value on 64-bit systems, where its own adjustment ends.
MMAP_THRESHOLD = 32 << 20
# Free memory kept at the top of the heap during a run.
KEPT_BYTES = 1 << 30
# After a run: twice the mmap threshold, where glibc's own adjustment ends as well.
TRIM_THRESHOLD_AFTER = 2 * MMAP_THRESHOLD


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc, else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[bool]:
    """Keeps up to 1 GiB of freed memory mapped inside the block (glibc only).

    Sets glibc's mmap threshold to 32 MiB and its trim threshold to 1 GiB. On leaving, the trim
    threshold goes down to 64 MiB and the memory kept above it is given back to the system
    (``malloc_trim``). Setting the thresholds ends glibc's own adjustment of them for the
    process; the values left (32 and 64 MiB) are those where that adjustment ends.

    Yields:
        Whether the thresholds were set.
    """
    libc = _glibc()
    kept = (
        libc is not None
        and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        and libc.mallopt(_M_TRIM_THRESHOLD, KEPT_BYTES) == 1
    )
    if not kept:
        logger.debug("freed memory is not kept: the C library is not glibc or refused mallopt")
    try:
        yield kept
    finally:
        if kept:
            assert libc is not None
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_AFTER)
            libc.malloc_trim(0)

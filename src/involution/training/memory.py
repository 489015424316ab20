"""Keeping freed memory mapped while training on the CPU.

glibc gives the free memory at the top of its heap back to the system once it exceeds a trim
threshold, which it adjusts as mapped blocks are freed: at most 64 MiB, twice its largest
threshold for giving a block a mapping of its own (32 MiB). A training step frees its
activations when it ends, usually more than that, so the next step faults them in again, 4 KiB
at a time, each page zeroed by the kernel. Training RedNet-26 on the demo's digits, that was
1.4-1.8 million page faults and 5-6 s of system time in 3 epochs (BENCHMARKS.md).
:func:`keep_freed_memory` turns the trimming off for the duration of a run, so that each step
reuses the memory of the one before, as the allocators PyTorch's CPU tuning guide suggests
(jemalloc, tcmalloc) do.

Blocks of 32 MiB and more keep their own mappings, which are unmapped when freed, as glibc does
by default. The largest of them in RedNet are the CPU kernels' results (the kernel gradient is
three times its input), and those have memory of their own (``ops/cpu/results.py``), which the
block keeps for reuse as well, whatever the allocator.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import threading
from collections.abc import Iterator

import torch

from ..ops.cpu import results

logger = logging.getLogger(__name__)

__all__ = ["keep_freed_memory"]

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Setting either threshold stops glibc's own adjustment of both for the rest of the process, so
# both are set, to where that adjustment ends on a 64-bit system: 32 MiB, the largest mmap
# threshold glibc accepts, and twice that to trim after a run.
_MMAP_THRESHOLD = 32 << 20
_TRIM_THRESHOLD_AFTER = 2 * _MMAP_THRESHOLD
# A trim threshold of -1 turns trimming off.
_NO_TRIM = -1
# Environment variables by which a user sets glibc's allocator; their settings are left alone.
_USER_SETTINGS = (
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)
# The blocks inside which glibc's trimming is off now, nested or in other threads (the last to
# end turns it back on), and glibc while they run.
_untrimmed_blocks = 0
_untrimmed_libc: ctypes.CDLL | None = None
_untrimmed_lock = threading.Lock()


def _glibc() -> ctypes.CDLL | None:
    """glibc, where it is the C library and its malloc the process's, else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        # Another allocator preloaded (jemalloc, tcmalloc) replaces malloc, not glibc's mallopt.
        process_malloc = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
        if process_malloc != ctypes.cast(libc.malloc, ctypes.c_void_p).value:
            return None
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def _user_settings() -> list[str]:
    """The environment variables by which the user has set glibc's allocator."""
    named = [name for name in _USER_SETTINGS if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        named.append("GLIBC_TUNABLES")
    return named


@contextlib.contextmanager
def keep_freed_memory(device: torch.device | str = "cpu") -> Iterator[bool]:
    """Keeps freed memory for reuse inside the block, for work on ``device``.

    On the CPU, the CPU kernels' large results are kept (``ops/cpu/results.py``: given back when
    the outermost block ends), and glibc's trimming of freed memory is turned off: this sets
    glibc's mmap threshold to 32 MiB and turns its trim threshold off. On leaving, even by
    an exception, the trim threshold is set to 64 MiB and the free memory is given back to the
    system (``malloc_trim``). For the rest of the process glibc keeps these two thresholds
    (32 and 64 MiB, where its own adjustment of them ends on 64-bit systems) and no longer
    adjusts them.

    Nothing is changed for a device other than the CPU. glibc is left alone where the allocator
    is not glibc's, or where the user has set glibc's allocator through its environment
    variables (``MALLOC_TRIM_THRESHOLD_`` and the like, or ``glibc.malloc`` tunables): setting
    one of them is also the way to opt out. Blocks nest, and may run in several threads: the
    last to end turns trimming back on.

    Yields:
        Whether glibc's trimming was turned off.
    """
    if torch.device(device).type != "cpu":
        yield False
        return
    with results.keep(), _untrimmed() as untrimmed:
        yield untrimmed


@contextlib.contextmanager
def _untrimmed() -> Iterator[bool]:
    """glibc's trimming turned off inside the block, where glibc can be set (see above)."""
    global _untrimmed_blocks, _untrimmed_libc
    with _untrimmed_lock:
        if not _untrimmed_blocks:
            _untrimmed_libc = _trimming_off()
        untrimmed = _untrimmed_libc is not None
        if untrimmed:
            _untrimmed_blocks += 1
    if not untrimmed:
        yield False
        return
    try:
        yield True
    finally:
        with _untrimmed_lock:
            _untrimmed_blocks -= 1
            if not _untrimmed_blocks and _untrimmed_libc is not None:
                _untrimmed_libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_AFTER)
                _untrimmed_libc.malloc_trim(0)
                _untrimmed_libc = None


def _trimming_off() -> ctypes.CDLL | None:
    """Turns glibc's trimming off; returns glibc, or None where nothing was changed."""
    libc = _glibc()
    if libc is None:
        logger.debug("freed memory is not kept: the allocator is not glibc's")
        return None
    user = _user_settings()
    if user:
        logger.debug("freed memory is not kept: glibc's allocator is set by %s", ", ".join(user))
        return None
    # The first call is refused on 32-bit systems (a lower maximum), before anything changed.
    if libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) != 1:
        logger.debug("freed memory is not kept: glibc refused an mmap threshold of 32 MiB")
        return None
    libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM)
    return libc

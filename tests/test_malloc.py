"""keep_freed_memory(): freed memory is reused inside the block and given back after it.

Measured by the page faults of allocating and freeing 128 MiB in 4 MiB tensors, in a fresh
process (glibc's thresholds adjust themselves over a process's life).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from involution.training import malloc

_PROBE = """
import json, resource, torch
from involution.training.malloc import keep_freed_memory

BLOCKS, BLOCK = 32, 4 << 20

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def cycle():
    before = faults()
    blocks = [torch.ones(BLOCK // 4) for _ in range(BLOCKS)]
    del blocks
    return faults() - before

big = torch.ones((30 << 20) // 4)  # glibc's own thresholds go as far as they can
del big
cycle()
result = {"pages": BLOCKS * BLOCK // resource.getpagesize()}
with keep_freed_memory() as kept:
    cycle()  # the first cycle inside maps the memory that the next ones reuse
    result["kept"], result["inside"] = kept, cycle()
result["after"] = cycle()
print(json.dumps(result))
"""


def _probe() -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.skipif(
    any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")),
    reason="another allocator is preloaded",
)
def test_freed_memory_is_reused_inside_and_given_back_after():
    result = _probe()
    pages = result["pages"]
    assert result["kept"] is True
    # Inside, the 128 MiB come from memory already mapped: next to no faults.
    assert result["inside"] < pages // 10, result
    # After, the memory was given back: the next cycle faults it in again.
    assert result["after"] > pages // 2, result


def test_without_glibc_nothing_is_set(monkeypatch):
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("", ""))
    with malloc.keep_freed_memory() as kept:
        assert kept is False

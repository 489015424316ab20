"""keep_freed_memory(): freed memory stays mapped inside the block and is given back after it.

The real allocator is measured in a fresh process (glibc adjusts its thresholds over a process's
life), by its resident memory; the calls the function makes are checked on a recording stand-in
for the C library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from involution.training import memory

SRC = Path(__file__).resolve().parents[1] / "src"
BLOCKS, BLOCK = 32, 4 << 20

_PROBE = f"""
import json, resource, torch
from involution.training.memory import keep_freed_memory

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

# No warm-up: in a fresh process glibc maps each of these blocks on its own until one is freed.
with keep_freed_memory() as kept:
    blocks = [torch.ones({BLOCK} // 4) for _ in range({BLOCKS})]
    full = resident()
    del blocks
    inside = resident()
print(json.dumps({{"kept": kept, "freed_inside": full - inside, "freed_after": inside - resident()}}))
"""


@pytest.mark.skipif(
    memory._glibc() is None or not os.path.exists("/proc/self/statm"),
    reason="glibc's allocator, on Linux",
)
def test_freed_memory_stays_mapped_inside_and_is_given_back_after():
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    for name in (*memory._USER_SETTINGS, "GLIBC_TUNABLES"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kept"] is True
    total = BLOCKS * BLOCK
    assert result["freed_inside"] < total // 10, result
    assert result["freed_after"] > total // 2, result


class _RecordingLibc:
    """Stands in for glibc: records mallopt and malloc_trim calls."""

    def __init__(self, accepts: bool = True) -> None:
        self.accepts = accepts
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1 if self.accepts else 0

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def libc(monkeypatch) -> _RecordingLibc:
    fake = _RecordingLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: fake)
    for name in (*memory._USER_SETTINGS, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    return fake


def test_thresholds_set_inside_and_restored_after_an_exception(libc):
    with pytest.raises(KeyError), memory.keep_freed_memory() as kept:
        assert kept is True
        assert libc.calls == [("mallopt", -3, 32 << 20), ("mallopt", -1, -1)]
        raise KeyError("inside")
    assert libc.calls[2:] == [("mallopt", -1, 64 << 20), ("malloc_trim", 0)]


def test_nested_blocks_turn_trimming_back_on_when_the_outermost_ends(libc):
    off = [("mallopt", -3, 32 << 20), ("mallopt", -1, -1)]
    back_on = [("mallopt", -1, 64 << 20), ("malloc_trim", 0)]
    with memory.keep_freed_memory() as outer:
        with memory.keep_freed_memory() as inner:
            assert outer is True and inner is True
            assert libc.calls == off  # set once
        assert libc.calls == off  # the inner block's end left trimming off
    assert libc.calls == off + back_on
    with memory.keep_freed_memory():  # a later block sets the thresholds again
        pass
    assert libc.calls == 2 * (off + back_on)


def test_blocks_in_two_threads_turn_trimming_back_on_when_the_last_ends(libc):
    import threading

    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        with memory.keep_freed_memory():
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=other)
    thread.start()
    assert entered.wait(30)
    with memory.keep_freed_memory() as kept:
        assert kept is True
    assert ("malloc_trim", 0) not in libc.calls  # the other thread's block still runs
    release.set()
    thread.join(30)
    assert libc.calls[-2:] == [("mallopt", -1, 64 << 20), ("malloc_trim", 0)]
    assert libc.calls.count(("malloc_trim", 0)) == 1


def test_a_refused_threshold_changes_nothing_more(libc):
    libc.accepts = False
    with memory.keep_freed_memory() as kept:
        assert kept is False
    assert libc.calls == [("mallopt", -3, 32 << 20)]


@pytest.mark.parametrize(
    ("name", "value"),
    [("MALLOC_TRIM_THRESHOLD_", "1000000"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")],
)
def test_the_users_own_allocator_settings_are_left_alone(libc, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with memory.keep_freed_memory() as kept:
        assert kept is False
    assert libc.calls == []


def test_without_glibc_nothing_is_set(monkeypatch):
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("", ""))
    assert memory._glibc() is None
    with memory.keep_freed_memory() as kept:
        assert kept is False


def test_other_devices_change_nothing(libc):
    with memory.keep_freed_memory("cuda") as kept:
        assert kept is False
    assert libc.calls == []

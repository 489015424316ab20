"""Memory of the CPU kernels' large results (ops/cpu/results.py): huge pages, kept inside keep().

The size from which a result gets a mapping of its own is lowered in most tests (2 MiB, or one
byte) to keep the tensors small. Mappings are observed in /proc/self/smaps.
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

import pytest
import torch

from involution import functional
from involution.ops.cpu import results
from involution.training.memory import keep_freed_memory

from conftest import make_fused_inputs, make_inputs, needs_cpu_kernels

pytestmark = pytest.mark.skipif(
    not hasattr(mmap, "MADV_HUGEPAGE") or not Path("/proc/self/smaps").exists(),
    reason="needs Linux: huge-page advice and /proc/self/smaps",
)

HUGE = 1 << 21
SHAPE = (4, 64, 64, 64)  # 4 MiB in float32
CL_STRIDE = (64 * 64 * 64, 1, 64 * 64, 64)  # channels last


@pytest.fixture
def small_limit(monkeypatch):
    monkeypatch.setattr(results, "LARGE_BYTES", HUGE)


def _mapping(address: int) -> list[str] | None:
    """The flags of the mapping that holds ``address`` (``hg``: huge pages advised), or None
    where no mapping does."""
    inside = False
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                start, end = (int(v, 16) for v in first.split("-"))
                inside = start <= address < end
            elif inside and first == "VmFlags:":
                return line.split()[1:]
    return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_large_result_has_the_layout_asked_and_huge_pages(small_limit, dtype):
    t = results.empty(SHAPE, CL_STRIDE, dtype)
    assert (t.shape, t.stride(), t.dtype, t.device.type) == (SHAPE, CL_STRIDE, dtype, "cpu")
    assert t.data_ptr() % HUGE == 0
    for address in (t.data_ptr(), t.data_ptr() + t.nbytes - 1):
        assert "hg" in _mapping(address)
    values = torch.randn(SHAPE).to(dtype)
    t.copy_(values)
    assert torch.equal(t, values)


def test_a_result_is_stored_alone_even_on_a_larger_mapping(small_limit):
    """Its storage is its own bytes (what torch.save writes), not the mapping's."""
    with results.keep():
        larger = results.empty((6, 64, 64, 64), CL_STRIDE, torch.float32)
        address = larger.data_ptr()
        del larger
        t = results.empty(SHAPE, CL_STRIDE, torch.float32)
        assert t.data_ptr() == address  # the larger mapping, reused
        assert t.untyped_storage().nbytes() == t.nbytes


@pytest.mark.parametrize("limit", [HUGE, 1 << 62], ids=["mapped", "torch"])
def test_results_are_on_the_cpu_whatever_the_default_device(monkeypatch, limit):
    monkeypatch.setattr(results, "LARGE_BYTES", limit)
    with torch.device("meta"):
        t = results.empty(SHAPE, CL_STRIDE, torch.float32)
        with results.by_torch():
            u = results.empty(SHAPE, CL_STRIDE, torch.float32)
    assert t.device.type == "cpu" and u.device.type == "cpu"


@pytest.mark.parametrize("kernel", [False, True])
def test_the_layout_of_a_result_does_not_depend_on_its_size(monkeypatch, kernel):
    """Also for an input that is not dense (a slice of a channels-last tensor)."""
    from involution.ops.cpu import launch

    like = torch.randn(2, 8, 16, 32).contiguous(memory_format=torch.channels_last)[..., ::2]
    shape = (2, 2, 9, 16, 16) if kernel else (2, 8, 16, 16)
    strides = []
    for limit in (1 << 62, 1):  # PyTorch's memory, then a mapping
        monkeypatch.setattr(results, "LARGE_BYTES", limit)
        strides.append(launch._empty(shape, like, kernel=kernel).stride())
    assert strides[0] == strides[1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_gives_the_kept_mappings_back_first(small_limit):
    """A child (a DataLoader worker) sharing them would split their huge pages in the parent."""
    with results.keep():
        a = results.empty(SHAPE, CL_STRIDE, torch.float32)
        del a
        assert results.kept_bytes() > 0
        pid = os.fork()
        if pid == 0:  # the child: keeps nothing, and can still allocate
            ok = results.kept_bytes() == 0 and results.empty(SHAPE, CL_STRIDE, torch.float32)
            os._exit(0 if ok is not False else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        assert results.kept_bytes() == 0


def test_a_small_result_is_not_kept(small_limit):
    with results.keep():
        t = results.empty((4, 4), (4, 1), torch.float32)
        del t
        assert results.kept_bytes() == 0


def test_a_freed_result_is_reused_inside_keep_and_given_back_after(small_limit):
    nbytes = 4 * 64 * 64 * 64 * 4
    with results.keep():
        a = results.empty(SHAPE, CL_STRIDE, torch.float32)
        address = a.data_ptr()
        del a
        assert results.kept_bytes() >= nbytes
        b = results.empty(SHAPE, CL_STRIDE, torch.float32)
        assert b.data_ptr() == address  # already faulted in
        assert results.kept_bytes() == 0
        c = results.empty(SHAPE, CL_STRIDE, torch.float32)  # b is alive: new memory
        assert c.data_ptr() != address
        del b, c
        assert results.kept_bytes() >= 2 * nbytes
    assert results.kept_bytes() == 0
    assert _mapping(address) is None


def test_a_smaller_result_reuses_the_smallest_kept_mapping_that_fits(small_limit):
    with results.keep():
        large = results.empty((8, 64, 64, 64), (64 * 64 * 64, 1, 64 * 64, 64), torch.float32)
        larger = results.empty((16, 64, 64, 64), (64 * 64 * 64, 1, 64 * 64, 64), torch.float32)
        addresses = large.data_ptr(), larger.data_ptr()
        del large, larger
        small = results.empty(SHAPE, CL_STRIDE, torch.float32)
        assert small.data_ptr() == addresses[0]
        values = torch.randn(SHAPE)
        small.copy_(values)
        assert torch.equal(small, values)


def test_kept_and_live_mappings_stay_within_the_most_live_at_once(small_limit):
    """A result of another size does not pile a new mapping onto the kept ones."""
    with results.keep():
        a = results.empty(SHAPE, CL_STRIDE, torch.float32)  # the peak: one result
        address = a.data_ptr()
        del a
        kept = results.kept_bytes()
        assert kept > 0
        b = results.empty((8, 64, 64, 64), (64 * 64 * 64, 1, 64 * 64, 64), torch.float32)
        assert results.kept_bytes() == 0  # a's mapping was given back for b's ...
        start = b.data_ptr() - HUGE  # ... and unmapped, or b's mapping took its place
        assert _mapping(address) is None or start <= address < b.data_ptr() + b.nbytes
        del b
        assert results.kept_bytes() > kept


def test_outside_keep_a_freed_result_gives_its_mapping_back(small_limit):
    a = results.empty(SHAPE, CL_STRIDE, torch.float32)
    address = a.data_ptr()
    assert _mapping(address) is not None
    del a
    assert results.kept_bytes() == 0
    assert _mapping(address) is None


def test_a_result_alive_after_the_block_gives_its_mapping_back_when_freed(small_limit):
    with results.keep():
        a = results.empty(SHAPE, CL_STRIDE, torch.float32)
    address = a.data_ptr()
    del a
    assert results.kept_bytes() == 0
    assert _mapping(address) is None


def test_blocks_nest_and_give_back_on_an_exception(small_limit):
    with pytest.raises(KeyError), results.keep():
        with results.keep():
            a = results.empty(SHAPE, CL_STRIDE, torch.float32)
            del a
        assert results.kept_bytes() > 0  # the outer block still keeps
        raise KeyError
    assert results.kept_bytes() == 0


def test_a_result_freed_while_the_pool_is_locked_gives_its_mapping_back(small_limit):
    """As when a garbage collection frees one in the middle of the pool's own work."""
    box = [results.empty(SHAPE, CL_STRIDE, torch.float32)]
    address = box[0].data_ptr()

    def free_inside():
        with results._lock:
            box.clear()

    worker = threading.Thread(target=free_inside, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "freeing a result under the pool's lock deadlocked"
    assert _mapping(address) is None


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_keep_freed_memory_keeps_results_for_the_cpu_only(small_limit, device):
    with keep_freed_memory(device):
        a = results.empty(SHAPE, CL_STRIDE, torch.float32)
        del a
        assert (results.kept_bytes() > 0) == (device == "cpu")
    assert results.kept_bytes() == 0


def _plain(n, case, channels_last):
    x, w, kwargs = make_inputs(n, *case, dtype=torch.float32)
    if channels_last:  # and the kernel pixel-major, as a channels-last span makes it
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
        w = w.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)
    x, w = x.requires_grad_(), w.requires_grad_()
    out = functional.involution2d(x, w, backend="cpu", **kwargs)
    return [out.detach(), *torch.autograd.grad(out, (x, w), torch.randn_like(out))]


def _fused(n, case, channels_last):
    tensors, kwargs = make_fused_inputs((n, *case[:3], 9, *case[3:]), torch.float32)
    if channels_last:
        for name in ("input", "features"):
            tensors[name] = tensors[name].movedim(1, -1).contiguous().movedim(-1, 1)
    leaves = [t.requires_grad_() for t in tensors.values()]
    out = functional.fused_involution2d(*leaves, backend="cpu", **kwargs)
    return [out.detach(), *torch.autograd.grad(out, leaves, torch.randn_like(out))]


# (batch, channels, groups, size, kernel_size, stride, dilation): stride 3 with a 2-tap reach
# leaves input pixels that no tap reaches, whose gradient is a written zero.
CASES = [
    (2, 32, 2, (9, 7), 3, 1, 1),
    (1, 20, 1, (8, 9), 3, 3, 2),
    (1, 8, 2, (10, 10), 1, 3, 1),
    (2, 64, 4, (14, 13), 7, 1, 1),
]


@needs_cpu_kernels
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("op", [_plain, _fused], ids=["plain", "fused"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c[1]}-k{c[4]}-s{c[5]}-d{c[6]}")
def test_every_pass_writes_all_of_a_reused_result(monkeypatch, case, op, channels_last):
    """Every result on a kept mapping (from one byte on), first fresh and zero, then filled with
    NaN, freed and reused: the values are the same bit for bit."""
    monkeypatch.setattr(results, "LARGE_BYTES", 1)
    torch.manual_seed(0)
    with results.keep():
        fresh = op(2, case, channels_last)
        first = [t.clone() for t in fresh]
        for t in fresh:
            t.fill_(float("nan"))
        del fresh
        assert results.kept_bytes() > 0
        torch.manual_seed(0)
        reused = op(2, case, channels_last)
    for a, b in zip(first, reused, strict=True):
        assert torch.equal(a, b)


@needs_cpu_kernels
@pytest.mark.parametrize("channels_last", [False, True])
def test_every_pass_puts_its_large_results_on_huge_pages(small_limit, channels_last):
    """Out, input and kernel gradients of the plain op, out and input gradient of the fused one
    (2 MiB and more here) are on huge pages; the features' gradient (128 KiB) is not kept."""
    large = _plain(2, (8, 128, 8, (32, 32), 7, 1, 1), channels_last)
    fused = _fused(2, (8, 128, 8, (32, 32), 7, 1, 1), channels_last)
    large += fused[:2]
    for t in large:
        assert t.nbytes >= HUGE and t.data_ptr() % HUGE == 0
        assert "hg" in _mapping(t.data_ptr())
    with results.keep():
        grad_features = _fused(2, (8, 128, 8, (32, 32), 7, 1, 1), channels_last)[2]
        assert grad_features.nbytes < HUGE
        kept = results.kept_bytes()  # the other results of the call, freed
        del grad_features
        assert results.kept_bytes() == kept

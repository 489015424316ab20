"""The CPU backend (ops/cpu/) against the float64 reference, its layouts, threads and build.

Every comparison runs the op through ``functional`` with ``backend="cpu"`` on random inputs and
compares the output and both gradients with the reference backend in float64 on the same
(rounded) inputs. The channel counts per group cover each code path of the kernels: blocks of
16 channels (two vectors), 8 (one), and single channels, alone and mixed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from involution import functional
from involution import nn as involution_nn
from involution.ops import dispatch, layout
from involution.ops.cpu import build as cpu_build
from involution.ops.cpu import launch

from conftest import (
    assert_close_for,
    composed_reference,
    make_fused_inputs,
    make_inputs,
    needs_cpu_kernels,
)

pytestmark = needs_cpu_kernels

SRC = Path(__file__).resolve().parents[1] / "src"
FUNCS = {1: functional.involution1d, 2: functional.involution2d, 3: functional.involution3d}
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}

# (n, batch, channels, groups, size, kernel_size, stride, dilation)
CASES = [
    (2, 2, 32, 2, (9, 7), 3, 1, 1),  # 16 channels per group
    (2, 1, 48, 2, (10, 11), 5, 2, 1),  # 24 = 16 + 8
    (2, 2, 12, 3, (10, 11), 5, 2, 2),  # 4 single channels
    (2, 1, 20, 1, (8, 9), 3, 3, 2),  # 20 = 16 + 4 single
    (2, 1, 4, 4, (5, 4), 7, 2, 1),  # input smaller than the kernel
    (2, 2, 64, 4, (14, 13), 7, 1, 1),  # RedNet's K = 7, 16 channels per group
    (2, 1, 32, 2, (12, 12), 7, 2, 1),  # RedNet's downsampling layers
    (1, 2, 16, 1, (29,), 5, 2, 1),
    (1, 1, 8, 1, (13,), 3, 1, 3),
    (3, 1, 32, 2, (5, 6, 4), 3, 2, 1),
    (3, 1, 6, 3, (4, 5, 6), 3, 1, 1),
    # Stride 1, dilation 1 and 16 channels per group: the sliding blocks, K = 3, 5 and 7
    (2, 1, 32, 2, (9, 12), 5, 1, 1),
    (1, 2, 32, 2, (21,), 7, 1, 1),
    (3, 1, 16, 1, (4, 5, 7), 3, 1, 1),
    (2, 1, 32, 2, (11, 12), 3, 2, 2),  # grad_input's sliding block at stride = dilation = 2
]


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """Channels-last for any rank: (B, C, *spatial) stored as (B, *spatial, C)."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def _pixel_major(kernel: torch.Tensor) -> torch.Tensor:
    """(B, G, T, *out) stored as (B, *out, G, T): a channels-last span conv's output view."""
    n = kernel.dim() - 3
    return (
        kernel.permute(0, *range(3, 3 + n), 1, 2)
        .contiguous()
        .permute(0, n + 1, n + 2, *range(1, n + 1))
    )


def _sliced(t: torch.Tensor) -> torch.Tensor:
    """The same values, every other element of a twice-as-wide last dimension."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


LAYOUTS = {
    "contiguous": (lambda x: x, lambda w: w),
    "channels_last": (_channels_last, _pixel_major),
    "sliced": (_sliced, _sliced),
}


def _check_against_reference(n, x, w, kwargs, dtype, x_layout, w_layout):
    xs = x_layout(x.to(dtype)).requires_grad_()
    ws = w_layout(w.to(dtype)).requires_grad_()
    out = FUNCS[n](xs, ws, backend="cpu", **kwargs)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    gx, gw = torch.autograd.grad(out, (xs, ws), grad_out)

    x64 = xs.detach().double().requires_grad_()
    w64 = ws.detach().double().requires_grad_()
    ref = FUNCS[n](x64, w64, backend="reference", **kwargs)
    rx, rw = torch.autograd.grad(ref, (x64, w64), grad_out.double())
    assert out.dtype == gx.dtype == gw.dtype == dtype
    assert_close_for(dtype, out, ref)
    assert_close_for(dtype, gx, rx)
    assert_close_for(dtype, gw, rw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-c{c[2]}-g{c[3]}-k{c[5]}-s{c[6]}")
def test_matches_reference(case, layout_name, dtype):
    n, b, c, g, size, k, s, d = case
    x, w, kwargs = make_inputs(n, b, c, g, size, k, s, d)
    x_layout, w_layout = LAYOUTS[layout_name]
    _check_against_reference(n, x, w, kwargs, dtype, x_layout, w_layout)


def test_even_kernel_with_explicit_padding():
    x, w, kwargs = make_inputs(2, 2, 16, 1, (8, 9), 4, 1, 1, padding=(2, 1))
    _check_against_reference(2, x, w, kwargs, torch.float64, _channels_last, _pixel_major)


def test_mixed_layouts():
    """Channels-last input with a contiguous kernel, and the other way round."""
    x, w, kwargs = make_inputs(2, 2, 32, 2, (9, 10), 5, 1, 1)
    _check_against_reference(2, x, w, kwargs, torch.float32, _channels_last, lambda w: w)
    _check_against_reference(2, x, w, kwargs, torch.float32, lambda x: x, _pixel_major)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3),
    batch=st.integers(1, 2),
    group_channels=st.sampled_from([1, 3, 8, 16, 17]),
    groups=st.integers(1, 3),
    half_k=st.integers(0, 3),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    sizes=st.lists(st.integers(1, 11), min_size=3, max_size=3),
    layout_name=st.sampled_from(list(LAYOUTS)),
    seed=st.integers(0, 2**16),
)
def test_random_configurations(
    n, batch, group_channels, groups, half_k, stride, dilation, sizes, layout_name, seed
):
    k = 2 * half_k + 1
    if n == 3:
        k, sizes = min(k, 3), [min(s, 5) for s in sizes]
    size = tuple(sizes[:n])
    x, w, kwargs = make_inputs(
        n, batch, groups * group_channels, groups, size, k, stride, dilation, seed=seed
    )
    x_layout, w_layout = LAYOUTS[layout_name]
    _check_against_reference(n, x, w, kwargs, torch.float64, x_layout, w_layout)


@pytest.mark.parametrize("case", [CASES[1], CASES[7], CASES[9]], ids=["2d", "1d", "3d"])
def test_gradcheck_and_gradgradcheck_float64(case):
    n, _, c, g, size, k, s, d = case
    x, w, kwargs = make_inputs(n, 1, min(c, 18), min(g, 2), size, k, s, d)
    x = _channels_last(x).requires_grad_() if n > 1 else x.requires_grad_()
    w.requires_grad_()

    def fn(x, w):
        return FUNCS[n](x, w, backend="cpu", **kwargs)

    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))


def test_gradcheck_float64_sliding_blocks():
    """16 channels per group at stride 1 in channels last: the passes' sliding blocks."""
    x, w, kwargs = make_inputs(2, 1, 16, 1, (6, 7), 3, 1, 1)
    x = _channels_last(x).requires_grad_()
    w = _pixel_major(w).requires_grad_()

    def fn(x, w):
        return FUNCS[2](x, w, backend="cpu", **kwargs)

    assert torch.autograd.gradcheck(fn, (x, w))


def test_sliding_forward_equals_the_generic_block_bit_for_bit():
    """A kernel with contiguous taps or pixels takes the forward's sliding block, one with
    neither (every other element) the generic block: the same multiply-adds in the same order,
    so the same bits."""
    x, w, kwargs = make_inputs(2, 2, 32, 2, (9, 13), 7, 1, 1, dtype=torch.float32)
    x = _channels_last(x)
    generic = FUNCS[2](x, _sliced(w), backend="cpu", **kwargs)
    assert generic.abs().max() > 0
    for kernel in (_pixel_major(w), w):
        assert torch.equal(FUNCS[2](x, kernel, backend="cpu", **kwargs), generic)


def test_padding_taps_multiply_zeros_like_the_reference():
    """An infinite kernel value on a tap that falls in the padding gives NaN (inf * 0), as the
    reference's explicitly padded input does; a finite one there changes nothing."""
    x, w, kwargs = make_inputs(2, 1, 16, 1, (6, 6), 3, dtype=torch.float32)
    w[0, 0, 0, 0, 0] = float("inf")  # tap (0, 0) of pixel (0, 0) reads padding
    out = functional.involution2d(x, w, backend="cpu", **kwargs)
    ref = functional.involution2d(x, w, backend="reference", **kwargs)
    assert out[0, :, 0, 0].isnan().all() and ref[0, :, 0, 0].isnan().all()
    torch.testing.assert_close(out[0, :, 1:, 1:], ref[0, :, 1:, 1:])


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_zero(channels_last):
    x, w, kwargs = make_inputs(2, 0, 16, 1, (6, 7), 3, dtype=torch.float32)
    if channels_last:
        x, w = _channels_last(x), _pixel_major(w)
    x.requires_grad_()
    w.requires_grad_()
    out = functional.involution2d(x, w, backend="cpu", **kwargs)
    gx, gw = torch.autograd.grad(out.sum(), (x, w))
    assert out.shape == (0, 16, 6, 7) and gx.shape == x.shape and gw.shape == w.shape


@pytest.mark.parametrize("channels_last", [False, True])
def test_results_are_allocated_in_the_op_layout(channels_last):
    """The backend itself allocates what the op returns, so the op's conversion is a no-op:
    channels-last outputs and input gradients, pixel-major kernel gradients; contiguous ones
    for a contiguous input."""
    x, w, _ = make_inputs(2, 2, 32, 2, (7, 8), 3, 2, 1, dtype=torch.float32)
    g = torch.randn(2, 32, 4, 4)
    if channels_last:
        x, w, g = _channels_last(x), _pixel_major(w), _channels_last(g)
    geometry = ((3, 3), (2, 2), (1, 1), (1, 1))
    out = launch.forward(x, w, *geometry)
    gx = launch.grad_input(g, w, (7, 8), *geometry)
    gw = launch.grad_kernel(g, x, *geometry, 2)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)
    expected = layout.empty_kernel(gw.shape, x, pixel_major=channels_last)
    assert gw.stride() == expected.stride()


def _run_twice(threads: int) -> list[torch.Tensor]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w, kwargs = make_inputs(2, 4, 64, 4, (17, 15), 7, dtype=torch.float32)
        x = _channels_last(x).requires_grad_()
        w = _pixel_major(w).requires_grad_()
        out = functional.involution2d(x, w, backend="cpu", **kwargs)
        return [out.detach(), *torch.autograd.grad(out, (x, w), torch.ones_like(out))]
    finally:
        torch.set_num_threads(previous)


def test_deterministic_and_independent_of_the_thread_count():
    one = _run_twice(1)
    two = _run_twice(2)
    again = _run_twice(2)
    for a, b, c in zip(one, two, again, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_threads_split_rows_without_gaps():
    """More threads than the machine has cores, and rows that do not divide evenly."""
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        # 7 rows of 300 pixels: enough work for 3 threads, taking 2, 2 and 3 rows.
        x, w, kwargs = make_inputs(2, 1, 16, 1, (7, 300), 5, dtype=torch.float64)
        out = functional.involution2d(x, w, backend="cpu", **kwargs)
    finally:
        torch.set_num_threads(previous)
    assert_close_for(
        torch.float64, out, functional.involution2d(x, w, backend="reference", **kwargs)
    )


# ---------------------------------------------------------------------------------------------
# The fused op's native passes (kernel generated inside the kernels from the features).

FUSED = {
    1: functional.fused_involution1d,
    2: functional.fused_involution2d,
    3: functional.fused_involution3d,
}
# Hidden features per case: 20 = 16 + 4 and 9 = 8 + 1 cover each block of the small matrix
# products (two vectors, one vector, single values); 4 (fewer than 8) takes the features'
# gradient along the pixels, through the kernel gradient transposed in 8x8 tiles.
FUSED_CASES = [
    (n, b, c, g, (20, 9, 4)[i % 3], size, k, s, d)
    for i, (n, b, c, g, size, k, s, d) in enumerate(CASES)
]


def _assert_close_to_scale(dtype, actual, expected):
    """The dtype's tolerance relative to the largest value: the weight and feature gradients
    are sums over hundreds of pixels and taps, whose rounding error grows with the terms (the
    portable backend's composition differs from float64 as much)."""
    scale = max(1.0, expected.abs().max().item())
    assert_close_for(dtype, actual / scale, expected / scale)


def _fused_grads(n, tensors, kwargs, grad_out=None):
    leaves = {k: t.detach().requires_grad_() for k, t in tensors.items() if t is not None}
    out = FUSED[n](*(leaves.get(k) for k in tensors), backend="cpu", **kwargs)
    if grad_out is None:
        grad_out = torch.randn(out.shape, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    return out, dict(zip(leaves, grads, strict=True)), grad_out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize(
    "case", FUSED_CASES, ids=lambda c: f"{c[0]}d-c{c[2]}-g{c[3]}-r{c[4]}-k{c[6]}-s{c[7]}"
)
def test_fused_matches_composition(case, layout_name, dtype):
    """Output and the four gradients against span + reference involution in float64."""
    n = case[0]
    tensors, kwargs = make_fused_inputs(case, dtype, bias=case[4] == 20)
    to_layout = LAYOUTS[layout_name][0]
    tensors["input"] = to_layout(tensors["input"])
    tensors["features"] = to_layout(tensors["features"])
    if layout_name == "sliced":
        tensors["weight"] = tensors["weight"].t().contiguous().t()  # columns apart
    out, grads, grad_out = _fused_grads(n, tensors, kwargs)

    ref_tensors = {k: None if t is None else t.double() for k, t in tensors.items()}
    ref_leaves = [t.requires_grad_() for t in ref_tensors.values() if t is not None]
    ref = composed_reference(n, *ref_tensors.values(), kwargs)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    assert out.dtype == dtype
    assert_close_for(dtype, out, ref)
    for (name, grad), expected in zip(grads.items(), ref_grads, strict=True):
        assert grad.dtype == dtype and grad.shape == tensors[name].shape, name
        _assert_close_to_scale(dtype, grad, expected)
    if layout_name == "channels_last" and n > 1:
        assert out.is_contiguous(memory_format=CHANNELS_LAST[n])
        assert grads["input"].is_contiguous(memory_format=CHANNELS_LAST[n])
        assert grads["features"].is_contiguous(memory_format=CHANNELS_LAST[n])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "case", [FUSED_CASES[1], FUSED_CASES[7], FUSED_CASES[9]], ids=["2d", "1d", "3d"]
)
def test_fused_gradcheck_float64(case, bias):
    n, _, c, g, _, size, k, s, d = case
    tensors, kwargs = make_fused_inputs((n, 1, min(c, 18), min(g, 2), 5, size, k, s, d), bias=bias)
    leaves = tuple(t.requires_grad_() for t in tensors.values() if t is not None)

    def fn(*args):
        return FUSED[n](*args, *([] if bias else [None]), backend="cpu", **kwargs)

    assert torch.autograd.gradcheck(fn, leaves)


def _fused_run(threads: int) -> list[torch.Tensor]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # 2 * 40 output rows: more rows than chunks of weight-gradient sums, so chunks hold
        # several rows and threads get several chunks.
        case = (2, 2, 32, 2, 20, (40, 9), 5, 1, 1)
        tensors, kwargs = make_fused_inputs(case, torch.float32)
        gen = torch.Generator().manual_seed(1)
        grad_out = torch.randn(2, 32, 40, 9, generator=gen)
        out, grads, _ = _fused_grads(2, tensors, kwargs, grad_out)
        return [out.detach(), *grads.values()]
    finally:
        torch.set_num_threads(previous)


def test_fused_deterministic_and_independent_of_the_thread_count():
    runs = [_fused_run(threads) for threads in (1, 2, 3, 2)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


def test_fused_many_chunks_match_composition():
    case = (2, 2, 32, 2, 20, (40, 9), 5, 1, 1)
    tensors, kwargs = make_fused_inputs(case)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out, grads, grad_out = _fused_grads(2, tensors, kwargs)
    finally:
        torch.set_num_threads(previous)
    leaves = [t.requires_grad_() for t in tensors.values()]
    ref = composed_reference(2, *leaves, kwargs)
    for grad, expected in zip(
        grads.values(), torch.autograd.grad(ref, leaves, grad_out), strict=True
    ):
        assert_close_for(torch.float64, grad, expected)
    assert_close_for(torch.float64, out, ref)


def test_layers_run_the_fused_passes_on_the_cpu(monkeypatch):
    """An involution layer on the CPU generates its kernel inside the op (no kernel map), with
    the output and every gradient of the layer that stores the kernel (portable backend)."""
    assert dispatch.has_fused_passes("cpu")
    calls = []
    fused_forward = launch.fused_forward
    monkeypatch.setattr(
        launch, "fused_forward", lambda *args: calls.append("forward") or fused_forward(*args)
    )
    monkeypatch.setattr(launch, "forward", None)  # the unfused pass must not run
    torch.manual_seed(0)
    layer = involution_nn.Involution2d(32, 7, 2, group_channels=16, backend="cpu").double()
    x = torch.randn(2, 32, 11, 10, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *layer.parameters()], grad_out)
    assert calls == ["forward"]
    layer.backend = "torch"
    expected = layer(x)
    expected_grads = torch.autograd.grad(expected, [x, *layer.parameters()], grad_out)
    assert_close_for(torch.float64, out, expected)
    for a, b in zip(grads, expected_grads, strict=True):
        assert_close_for(torch.float64, a, b)


def test_auto_picks_cpu_on_the_cpu_and_not_for_other_dtypes():
    x = torch.ones(1, 1, 1, 1)
    w = torch.ones(1, 1, 1, 1, 1)
    assert dispatch.choose_backend(x, w, "auto") == "cpu"
    assert dispatch.choose_backend(x.half(), w.half(), "auto") == "torch"
    with pytest.raises(RuntimeError, match=r"cpu: input dtype torch.float16 is not supported"):
        dispatch.can_run_cpu(x.half(), w.half(), raise_error=True)
    with pytest.raises(RuntimeError, match=r"cpu: input is on meta"):
        dispatch.can_run_cpu(x.to("meta"), w.to("meta"), raise_error=True)


_FALLBACK_SCRIPT = """
import logging, torch
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
from involution import functional
from involution import nn as involution_nn
from involution.ops import dispatch
x, w = torch.randn(1, 16, 6, 6), torch.randn(1, 1, 9, 6, 6)
assert dispatch.choose_backend(x, w, "auto") == "torch"
for _ in range(3):
    out = functional.involution2d(x, w, 3)
ref = functional.involution2d(x, w, 3, backend="reference")
torch.testing.assert_close(out, ref)
# Another dtype's kernels fail to build as well, without a second warning.
assert dispatch.choose_backend(x.double(), w.double(), "auto") == "torch"
try:
    dispatch.can_run_cpu(x, w, raise_error=True)
except RuntimeError as error:
    print("REFUSED", error)
"""


def _run_without_build(tmp_path: Path, compiler: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=str(SRC), CXX=compiler, XDG_CACHE_HOME=str(tmp_path / "cache")
    )
    return subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )


def test_missing_compiler_falls_back_to_portable_with_one_log_line(tmp_path):
    result = _run_without_build(tmp_path, str(tmp_path / "no-such-compiler"))
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, result.stderr
    assert "CPU kernels unavailable, using the portable backend" in warnings[0]
    assert "no-such-compiler" in warnings[0] and "not found" in warnings[0]
    assert "REFUSED cpu: could not be built: C++ compiler" in result.stdout


def test_failing_compiler_falls_back_with_its_reason(tmp_path):
    script = tmp_path / "broken-cxx"
    script.write_text("#!/bin/sh\necho 'error: this compiler is broken' >&2\nexit 3\n")
    script.chmod(0o755)
    result = _run_without_build(tmp_path, str(script))
    assert "exited with 3: error: this compiler is broken" in result.stdout, result.stderr
    assert not list((tmp_path / "cache" / "involution").glob("*.so"))


def test_compiler_without_openmp_builds_kernels_that_run_on_one_thread(tmp_path):
    """A compiler that fails with -fopenmp: the kernels are built without it, and say so."""
    script = tmp_path / "no-openmp-cxx"
    script.write_text(
        '#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "error: no omp" >&2; exit 1; }; '
        'done\nexec c++ "$@"\n'
    )
    script.chmod(0o755)
    code = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
        "from involution import functional\n"
        "torch.set_num_threads(2)\n"
        "x, w = torch.randn(2, 16, 9, 8, dtype=torch.float64), torch.randn(2, 1, 9, 9, 8, "
        "dtype=torch.float64)\n"
        "out = functional.involution2d(x, w, 3, backend='cpu')\n"
        "ref = functional.involution2d(x, w, 3, backend='reference')\n"
        "torch.testing.assert_close(out, ref)\n"
    )
    env = dict(
        os.environ, PYTHONPATH=str(SRC), CXX=str(script), XDG_CACHE_HOME=str(tmp_path / "cache")
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, result.stderr
    assert "built without OpenMP, so they run on one thread" in warnings[0]
    assert "error: no omp" in warnings[0]
    (built,) = (tmp_path / "cache" / "involution").glob("*.so")
    assert b"GOMP_parallel" not in built.read_bytes()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_kernels_share_torchs_openmp_runtime():
    """One OpenMP runtime in the process: the kernels' threads are torch's, not a second pool."""
    for type_name in cpu_build.DTYPES:
        built = Path(cpu_build.library(type_name)._name).read_bytes()
        assert b"GOMP_parallel" in built  # built with OpenMP
    with open("/proc/self/maps", encoding="utf-8") as maps:
        names = (line.split()[-1] for line in maps)
        runtimes = {name for name in names if "gomp" in name or "omp5" in name or "libomp" in name}
    assert len(runtimes) == 1, runtimes


def test_second_process_loads_the_cached_library_without_building():
    """This process has built (or loaded) the kernels; another one finds them in the cache."""
    cpu_build.library("float32")
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from involution.ops.cpu.build import library; library('float32')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC))
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert "built the float32 CPU kernels" not in result.stderr, result.stderr


def test_first_use_of_a_dtype_builds_that_dtypes_library_alone(tmp_path):
    """A float32 model waits for the float32 kernels only; float64 is built on its first use."""
    cache = tmp_path / "cache"
    code = (
        "import logging, pathlib, sys, torch\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        "from involution import functional\n"
        "for dtype in (torch.float32, torch.float32, torch.float64):\n"
        "    x, w = torch.randn(2, 16, 9, 8, dtype=dtype), torch.randn(2, 1, 9, 9, 8, dtype=dtype)\n"
        "    out = functional.involution2d(x, w, 3, backend='cpu')\n"
        "    ref = functional.involution2d(x, w, 3, backend='reference')\n"
        "    torch.testing.assert_close(out, ref)\n"
        "    print('built:', len(list(pathlib.Path(sys.argv[1]).glob('*.so'))))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC), XDG_CACHE_HOME=str(cache))
    result = subprocess.run(
        [sys.executable, "-c", code, str(cache / "involution")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["built: 1", "built: 1", "built: 2"], result.stdout
    builds = [line for line in result.stderr.splitlines() if "built the" in line]
    assert len(builds) == 2 and "float32" in builds[0] and "float64" in builds[1], result.stderr


def test_library_names_an_unknown_storage_type():
    with pytest.raises(ValueError, match=r"type_name \('float16'\) must be one of float32"):
        cpu_build.library("float16")


def _running(pid: int) -> bool:
    """Whether process ``pid`` still runs (an exited one that nobody has reaped yet does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _stopped_soon(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_build_failure_names_the_command_and_its_first_error():
    failing = [
        "sh",
        "-c",
        "echo 'x.cpp:1: warning: odd'; echo 'x.cpp:2: error: broken' >&2; exit 3",
    ]
    with pytest.raises(cpu_build.BuildError, match=r"exited with 3: x.cpp:2: error: broken"):
        cpu_build._run(failing, 60)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_build_that_runs_too_long_is_stopped_with_the_processes_it_started(tmp_path):
    """The compiler driver's own processes (cc1plus, as) are stopped with it."""
    waiting = ["sh", "-c", 'sleep 60 & echo $! > "$0"; wait', str(tmp_path / "pid")]
    start = time.monotonic()
    with pytest.raises(cpu_build.BuildError, match="took longer than 1 s") as error:
        cpu_build._run(waiting, 1)
    assert time.monotonic() - start < 30
    assert isinstance(error.value, cpu_build._BuildTimeout)  # no second build after this one
    assert _stopped_soon(int((tmp_path / "pid").read_text()))


def test_kernel_read_with_any_strides():
    """A kernel expanded over its pixels (stride 0 there), as a broadcast would give."""
    x, w, kwargs = make_inputs(2, 2, 16, 1, (6, 5), 3, dtype=torch.float64)
    expanded = w[..., :1, :1].expand(w.shape)
    out = functional.involution2d(_channels_last(x), expanded, backend="cpu", **kwargs)
    ref = functional.involution2d(x, expanded.contiguous(), backend="reference", **kwargs)
    assert_close_for(torch.float64, out, ref)


def test_benchmark_op_measures_cpu_in_channels_last():
    """``involution bench op --channels-last``: pixel-major kernels, channels-last inputs."""
    from involution.benchmark import OpShape, benchmark_op
    from involution.cli.__main__ import main

    rows = benchmark_op(
        OpShape(2, 32, 9, 8), 3, backends=["cpu"], baselines=["depthwise"], passes=["forward"],
        repeats=1, channels_last=True,
    )  # fmt: skip
    assert [r["op"] for r in rows] == ["involution[cpu]", "conv2d depthwise"]
    assert all(r["median_ms"] > 0 for r in rows)
    argv = ["bench", "op", "--device", "cpu", "--shapes", "1x16x6x6", "--kernel-size", "3"]
    argv += ["--backends", "cpu"]
    assert main([*argv, "--repeats", "1", "--copy-mib", "0", "--channels-last"]) == 0

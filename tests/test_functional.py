"""The op against its reference: forward, gradients, gradcheck, opcheck, compile, random shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from involution import functional
from involution.ops import _library
from involution.ops.dispatch import BACKENDS

from conftest import TOLERANCES, assert_close_for, make_inputs

FUNCS = {1: functional.involution1d, 2: functional.involution2d, 3: functional.involution3d}
FAST_BACKENDS = [b for b in BACKENDS if b != "reference" and b != "triton"]

# (n, batch, channels, groups, size, kernel_size, stride, dilation)
CASES = [
    (2, 2, 8, 2, (9, 7), 3, 1, 1),
    (2, 1, 6, 3, (10, 11), 5, 2, 1),
    (2, 2, 4, 1, (8, 8), 3, 3, 2),
    (2, 1, 4, 4, (5, 4), 7, 2, 1),  # input smaller than the kernel
    (2, 3, 4, 2, (6, 6), 1, 1, 1),
    (1, 2, 6, 2, (13,), 5, 2, 1),
    (3, 1, 4, 2, (5, 6, 4), 3, 2, 1),
]


def _run(backend, n, x, w, kwargs):
    return FUNCS[n](x, w, backend=backend, **kwargs)


def _reference64(n, x, w, kwargs):
    return _run("reference", n, x.double(), w.double(), kwargs)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_grads_match_reference(backend, dtype, case):
    n, b, c, g, size, k, s, d = case
    x, w, kwargs = make_inputs(n, b, c, g, size, k, s, d, dtype=dtype)
    x.requires_grad_()
    w.requires_grad_()
    out = _run(backend, n, x, w, kwargs)
    grad_out = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), grad_out)

    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = _reference64(n, x64, w64, kwargs)
    rx, rw = torch.autograd.grad(ref, (x64, w64), grad_out.double())
    assert out.dtype == dtype
    assert_close_for(dtype, out, ref)
    assert_close_for(dtype, gx, rx)
    assert_close_for(dtype, gw, rw)


@pytest.mark.parametrize("backend", [*FAST_BACKENDS, "reference"])
@pytest.mark.parametrize("case", CASES[:2] + CASES[5:])
def test_gradcheck_float64(backend, case):
    n, b, c, g, size, k, s, d = case
    x, w, kwargs = make_inputs(n, b, c, g, size, k, s, d)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: _run(backend, n, x, w, kwargs), (x, w))


@pytest.mark.parametrize("case", [CASES[1], CASES[5]])
def test_gradgradcheck_torch_backend(case):
    n, b, c, g, size, k, s, d = case
    x, w, kwargs = make_inputs(n, b, c, g, size, k, s, d)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, w: _run("torch", n, x, w, kwargs), (x, w))


def test_opcheck_all_ops():
    x, w, _ = make_inputs(2, 2, 4, 2, (7, 6), 3, 2, 1, dtype=torch.float32)
    geometry = ([3, 3], [2, 2], [1, 1], [1, 1])
    g = torch.randn(2, 4, 4, 3)
    samples = [
        (_library.involution, (x.requires_grad_(), w.requires_grad_(), *geometry, "torch")),
        (_library.grad_input, (g, w.detach(), [7, 6], *geometry, "torch")),
        (_library.grad_kernel, (g, x.detach(), *geometry, 2, "torch")),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x, w, kwargs = make_inputs(2, 2, 8, 2, (9, 8), 3, 2, 1, dtype=torch.float32)

    def fn(x, w):
        return functional.involution2d(x.sin(), w, **kwargs).square().sum()

    compiled = torch.compile(fn, fullgraph=True)
    xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
    xc, wc = x.clone().requires_grad_(), w.clone().requires_grad_()
    eager = fn(xe, we)
    eager.backward()
    result = compiled(xc, wc)
    result.backward()
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(wc.grad, we.grad)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3),
    batch=st.integers(0, 2),
    group_channels=st.integers(1, 3),
    groups=st.integers(1, 3),
    half_k=st.integers(0, 4),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 3),
    sizes=st.lists(st.integers(1, 12), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_random_configurations(
    n, batch, group_channels, groups, half_k, stride, dilation, sizes, seed
):
    k = 2 * half_k + 1
    if n == 3:
        k = min(k, 3)
        sizes = [min(s, 6) for s in sizes]
    size = tuple(sizes[:n])
    x, w, kwargs = make_inputs(
        n, batch, groups * group_channels, groups, size, k, stride, dilation, seed=seed
    )
    x.requires_grad_()
    w.requires_grad_()
    out = _run("torch", n, x, w, kwargs)
    ref = _reference64(n, x, w, kwargs)
    assert_close_for(torch.float64, out, ref)
    if batch:
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, w), g)
        want = torch.autograd.grad(ref, (x, w), g)
        for a, e in zip(got, want, strict=True):
            assert_close_for(torch.float64, a, e)


def test_even_kernel_with_explicit_padding():
    x, w, kwargs = make_inputs(2, 1, 4, 2, (8, 9), 4, 1, 1, padding=1)
    out = functional.involution2d(x, w, **kwargs)
    assert out.shape == (1, 4, 7, 8)
    assert_close_for(torch.float64, out, _reference64(2, x, w, kwargs))


def test_batch_zero_returns_empty():
    x, w, kwargs = make_inputs(2, 0, 4, 2, (8, 8), 3)
    out = functional.involution2d(x, w, **kwargs)
    assert out.shape == (0, 4, 8, 8)


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_non_contiguous_inputs(layout):
    x, w, kwargs = make_inputs(2, 2, 8, 2, (9, 9), 3, dtype=torch.float32)
    if layout == "channels_last":
        xs, ws = x.to(memory_format=torch.channels_last), w
    elif layout == "transposed":
        xs = x.transpose(2, 3).contiguous().transpose(2, 3)
        ws = w.transpose(3, 4).contiguous().transpose(3, 4)
    else:
        big = torch.randn(2, 16, 9, 9)
        big[:, ::2] = x
        xs, ws = big[:, ::2], w
    assert not xs.is_contiguous()
    torch.testing.assert_close(
        functional.involution2d(xs, ws, **kwargs), functional.involution2d(x, w, **kwargs)
    )


@pytest.mark.parametrize("backend", [*FAST_BACKENDS, "reference"])
def test_nan_and_inf_propagate(backend):
    x, w, kwargs = make_inputs(2, 1, 4, 1, (6, 6), 3, dtype=torch.float32)
    x[0, 1, 2, 2] = float("nan")
    w[0, 0, 4, 4, 4] = float("inf")
    out = functional.involution2d(x, w, backend=backend, **kwargs)
    # The NaN pixel reaches every output pixel whose 3x3 window covers it, in its channel only.
    assert out[0, 1, 1:4, 1:4].isnan().all()
    assert not out[0, 0, 0:1, 0:1].isnan().any()
    # The infinite centre tap at pixel (4, 4) makes that pixel infinite or NaN in every channel.
    assert (~out[0, :, 4, 4].isfinite()).all()
    assert out[0, 0, 0, 0].isfinite()


def test_tolerance_table_covers_tested_dtypes():
    assert {torch.float64, torch.float32, torch.bfloat16} <= set(TOLERANCES)


def test_meta_tensors_propagate_shapes():
    x = torch.empty(2, 8, 9, 7, device="meta")
    w = torch.empty(2, 2, 9, 5, 4, device="meta")
    out = functional.involution2d(x, w, kernel_size=3, stride=2)
    assert out.device.type == "meta" and out.shape == (2, 8, 5, 4)

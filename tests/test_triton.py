"""The Triton backend against the reference, under Triton's interpreter and on CUDA.

CPU tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set by ``make test``)
on small shapes; the ``gpu`` tests run the same checks at RedNet-50's layer shapes on CUDA.
Every comparison is against the reference backend in float64 on the same (rounded) inputs.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from involution.functional import (
    involution1d,
    involution2d,
    involution3d,
    output_size,
    resolve_geometry,
)
from involution.ops import dispatch

triton = pytest.importorskip(
    "triton", reason="triton is not installed (pip install 'involution[triton]')"
)
from involution.ops.triton import launch  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="CPU tests of the Triton kernels need TRITON_INTERPRET=1"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FUNCTIONS = {1: involution1d, 2: involution2d, 3: involution3d}
# (rtol, atol) of triton against the float64 reference, per input dtype. The reduced-precision
# outputs are rounded once from a float32 accumulator, so their error is about one rounding.
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1.6e-2, 5e-2),
}


def make_case(
    n, batch, channels, groups, size, kernel_size, stride, dilation, padding, dtype, device
):
    gen = torch.Generator().manual_seed(batch * 1000 + channels * 10 + n)
    geometry = resolve_geometry(n, kernel_size, stride, padding, dilation)
    out = output_size(size, *geometry)
    x = torch.randn(batch, channels, *size, generator=gen, dtype=torch.float64)
    w = torch.randn(batch, groups, math.prod(geometry[0]), *out, generator=gen, dtype=torch.float64)
    g = torch.randn(batch, channels, *out, generator=gen, dtype=torch.float64)
    kwargs = {
        "kernel_size": kernel_size,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
    }
    return (t.to(device=device, dtype=dtype) for t in (x, w, g)), kwargs


def forward_and_grads(fn, x, w, g, backend, **kwargs):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = fn(x, w, backend=backend, **kwargs)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    return y.detach(), gx, gw


def assert_matches_reference(n, dtype, device, *case):
    (x, w, g), kwargs = make_case(n, *case, dtype=dtype, device=device)
    fn = FUNCTIONS[n]
    got = forward_and_grads(fn, x, w, g, "triton", **kwargs)
    expected = forward_and_grads(fn, x.double(), w.double(), g.double(), "reference", **kwargs)
    rtol, atol = TOLERANCES[dtype]
    for name, a, b in zip(("output", "grad_input", "grad_kernel"), got, expected, strict=True):
        assert a.dtype == dtype, name
        assert a.shape == b.shape, name
        torch.testing.assert_close(
            a.double(), b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


# (batch, channels, groups, size, kernel_size, stride, dilation, padding)
CASES_2D = [
    (2, 8, 2, (9, 7), 3, 1, 1, None),  # groups, odd sizes
    (1, 6, 3, (11, 10), 5, 2, 1, None),  # stride 2
    (2, 5, 1, (8, 9), 3, 3, 2, None),  # stride 3, dilation 2, 5 channels: two channel chunks
    (1, 4, 4, (7, 13), 3, 2, 1, 0),  # one channel per group, no padding
    (1, 3, 1, (6, 7), (3, 5), (2, 1), (1, 2), None),  # rectangular kernel, mixed geometry
    (1, 2, 1, (10, 11), 9, 1, 1, None),  # K = 9
    (1, 3, 1, (5, 6), 2, 1, 1, 1),  # even kernel with explicit padding
]


@needs_interpreter
@pytest.mark.parametrize("case", CASES_2D, ids=str)
def test_2d_float32(case):
    assert_matches_reference(2, torch.float32, "cpu", *case)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES_2D[:3], ids=str)
def test_2d_reduced_precision(case, dtype):
    assert_matches_reference(2, dtype, "cpu", *case)


@needs_interpreter
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_1d(dtype):
    assert_matches_reference(1, dtype, "cpu", 2, 6, 2, (13,), 5, 2, 1, None)


@needs_interpreter
def test_3d():
    assert_matches_reference(3, torch.float32, "cpu", 1, 4, 2, (5, 6, 7), 3, (1, 2, 1), 1, None)


@needs_interpreter
def test_batch_zero():
    assert_matches_reference(2, torch.float32, "cpu", 0, 4, 2, (5, 5), 3, 1, 1, None)


@needs_interpreter
@pytest.mark.parametrize("rows", launch.STRIP_ROWS)
def test_every_strip_length(rows, monkeypatch):
    """The strip lengths the GPU autotuner may pick, forced one at a time."""
    config = triton.Config({"BLOCK_P": 16, "ROWS": rows}, num_warps=1)
    for tuner in (launch._forward, launch._grad_input, launch._grad_kernel):
        monkeypatch.setattr(tuner, "configs", [config])
    for case in (CASES_2D[1], CASES_2D[2], CASES_2D[4]):
        assert_matches_reference(2, torch.float32, "cpu", *case)
    assert_matches_reference(3, torch.float32, "cpu", 1, 4, 2, (5, 6, 7), 3, (1, 2, 1), 1, None)


@needs_interpreter
def test_channels_last_and_strided_inputs():
    (x, w, g), kwargs = make_case(2, 2, 8, 2, (9, 7), 3, 1, 1, None, torch.float32, "cpu")
    expected = forward_and_grads(involution2d, x, w, g, "triton", **kwargs)
    x_cl = x.to(memory_format=torch.channels_last)
    w_strided = torch.cat([w, w], dim=-1)[..., : w.shape[-1]]
    got = forward_and_grads(involution2d, x_cl, w_strided, g, "triton", **kwargs)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_interpreter
def test_deterministic():
    (x, w, g), kwargs = make_case(2, 1, 6, 3, (11, 10), 5, 2, 1, None, torch.float32, "cpu")
    first = forward_and_grads(involution2d, x, w, g, "triton", **kwargs)
    second = forward_and_grads(involution2d, x, w, g, "triton", **kwargs)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_autocast_runs_in_low_precision(backend):
    (x, w, g), kwargs = make_case(2, 2, 8, 2, (9, 7), 3, 1, 1, None, torch.float32, "cpu")
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = involution2d(x, w.bfloat16(), backend=backend, **kwargs)
    assert y.dtype == torch.bfloat16
    (gx,) = torch.autograd.grad(y, x, g.bfloat16())
    assert gx.dtype == torch.float32
    x_low, w_low = x.detach().bfloat16().double(), w.bfloat16().double()
    expected = involution2d(x_low, w_low, backend="reference", **kwargs)
    rtol, atol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(y.double(), expected, rtol=rtol, atol=atol)


def test_autocast_compiles_fullgraph():
    (x, w, _), kwargs = make_case(2, 2, 8, 2, (9, 7), 3, 1, 1, None, torch.float32, "cpu")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(x, w):
        return involution2d(x, w, backend="torch", **kwargs)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x, w)
    assert y.dtype == torch.bfloat16
    expected = involution2d(
        x.bfloat16().double(), w.bfloat16().double(), backend="reference", **kwargs
    )
    torch.testing.assert_close(y.double(), expected, rtol=1.6e-2, atol=5e-2)


def test_auto_never_picks_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w = torch.randn(1, 4, 5, 5), torch.randn(1, 2, 9, 5, 5)
    assert dispatch.choose_backend(x, w, "auto") == "torch"


def test_refusals_explain_themselves(monkeypatch):
    x, w = torch.randn(1, 4, 5, 5), torch.randn(1, 2, 9, 5, 5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.can_run_triton(x, w)
    with pytest.raises(RuntimeError, match="triton: input is on cpu"):
        involution2d(x, w, 3, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match=r"triton: input dtype torch\.float64 is not supported"):
        involution2d(x.double(), w.double(), 3, backend="triton")
    monkeypatch.setattr(dispatch, "_triton_installed", lambda: False)
    with pytest.raises(RuntimeError, match="triton: not installed"):
        dispatch.can_run_triton(x, w, raise_error=True)


# RedNet-50's involution layers: (channels, size, kernel_size, stride), 16 channels per group.
REDNET_LAYERS = [(32, 112, 3, 1), (64, 56, 7, 1), (128, 56, 7, 2), (512, 7, 7, 1)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layer", REDNET_LAYERS, ids=str)
def test_rednet_shapes_on_cuda(layer, dtype):
    channels, size, kernel_size, stride = layer
    case = (8, channels, channels // 16, (size, size), kernel_size, stride, 1, None)
    assert_matches_reference(2, dtype, "cuda", *case)


@pytest.mark.gpu
@needs_cuda
def test_odd_geometry_on_cuda():
    for case in CASES_2D[2:5]:
        assert_matches_reference(2, torch.float32, "cuda", *case)
    assert_matches_reference(1, torch.float16, "cuda", 2, 6, 2, (13,), 5, 2, 1, None)
    assert_matches_reference(3, torch.bfloat16, "cuda", 2, 32, 2, (9, 10, 11), 3, 2, 1, None)


@pytest.mark.gpu
@needs_cuda
def test_auto_picks_triton_on_cuda():
    x = torch.randn(1, 16, 8, 8, device="cuda")
    w = torch.randn(1, 1, 9, 8, 8, device="cuda")
    assert dispatch.choose_backend(x, w, "auto") == "triton"

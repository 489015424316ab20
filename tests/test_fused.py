"""The fused op (kernel generated inside the involution) against its composition, on every backend."""

from __future__ import annotations

import math
import os
import types

import pytest
import torch

from involution import functional
from involution import nn as nn_module
from involution.ops import _library, dispatch, portable, span
from involution.ops.dispatch import BACKENDS

from conftest import assert_close_for, composed_reference, make_fused_inputs

FUSED = {
    1: functional.fused_involution1d,
    2: functional.fused_involution2d,
    3: functional.fused_involution3d,
}
PLAIN = {1: functional.involution1d, 2: functional.involution2d, 3: functional.involution3d}
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
FUSED_BACKENDS = [b for b in BACKENDS if b != "triton" or INTERPRETED]
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}

# (n, batch, channels, groups, hidden, size, kernel_size, stride, dilation)
CASES = [
    (2, 2, 8, 2, 3, (9, 7), 3, 1, 1),
    (2, 1, 6, 3, 4, (10, 11), 5, 2, 1),
    (2, 2, 4, 1, 2, (8, 8), 3, 3, 2),
    (1, 2, 6, 2, 3, (13,), 5, 2, 1),
    (3, 1, 4, 2, 2, (5, 6, 4), 3, 2, 1),
]


def _grads(out, tensors, grad_out):
    leaves = [t for t in tensors.values() if t is not None]
    return dict(
        zip(
            [k for k, t in tensors.items() if t is not None],
            torch.autograd.grad(out, leaves, grad_out),
            strict=True,
        )
    )


def _requires_grad(tensors):
    return {k: None if t is None else t.detach().requires_grad_() for k, t in tensors.items()}


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-k{c[6]}-s{c[7]}")
def test_fused_matches_composition(backend, dtype, case):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float32, float16 and bfloat16")
    n = case[0]
    tensors, kwargs = make_fused_inputs(case, dtype)
    tensors = _requires_grad(tensors)
    out = FUSED[n](*tensors.values(), backend=backend, **kwargs)
    grad_out = torch.randn_like(out)
    grads = _grads(out, tensors, grad_out)

    ref_tensors = _requires_grad(
        {k: None if t is None else t.detach().double() for k, t in tensors.items()}
    )
    ref = composed_reference(n, *ref_tensors.values(), kwargs)
    ref_grads = _grads(ref, ref_tensors, grad_out.double())
    assert out.dtype == dtype
    assert_close_for(dtype, out, ref)
    for name, grad in grads.items():
        assert grad.shape == tensors[name].shape, name
        assert_close_for(dtype, grad, ref_grads[name])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=["2d", "1d", "3d"])
def test_gradcheck_float64(case, bias):
    tensors, kwargs = make_fused_inputs(case, bias=bias)
    tensors = _requires_grad(tensors)
    n = case[0]

    def fn(*args):
        return FUSED[n](*args, backend="torch", **kwargs)

    assert torch.autograd.gradcheck(fn, tuple(tensors.values()))


def test_gradgradcheck_composed_backward():
    tensors, kwargs = make_fused_inputs(CASES[1])
    tensors = _requires_grad(tensors)

    def fn(*args):
        return functional.fused_involution2d(*args, backend="torch", **kwargs)

    assert torch.autograd.gradgradcheck(fn, tuple(tensors.values()))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_channels_last_in_channels_last_out(backend):
    tensors, kwargs = make_fused_inputs(CASES[1], torch.float32)
    tensors["input"] = tensors["input"].contiguous(memory_format=torch.channels_last)
    tensors["features"] = tensors["features"].contiguous(memory_format=torch.channels_last)
    tensors = _requires_grad(tensors)
    out = functional.fused_involution2d(*tensors.values(), backend=backend, **kwargs)
    grads = _grads(out, tensors, torch.randn_like(out))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert grads["input"].is_contiguous(memory_format=torch.channels_last)
    assert grads["features"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_batch_zero(backend):
    case = (2, 0, 8, 2, 3, (9, 7), 3, 1, 1)
    tensors, kwargs = make_fused_inputs(case, torch.float32)
    tensors = _requires_grad(tensors)
    out = functional.fused_involution2d(*tensors.values(), backend=backend, **kwargs)
    assert out.shape == (0, 8, 9, 7)
    grads = _grads(out, tensors, torch.randn_like(out))
    assert grads["weight"].shape == tensors["weight"].shape
    assert not grads["weight"].any()  # no pixels: nothing to accumulate


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_two_runs_are_bit_identical(backend):
    tensors, kwargs = make_fused_inputs(CASES[0], torch.float32)

    def run():
        leaves = _requires_grad(tensors)
        out = functional.fused_involution2d(*leaves.values(), backend=backend, **kwargs)
        return out, _grads(out, leaves, torch.ones_like(out))

    (out1, grads1), (out2, grads2) = run(), run()
    assert torch.equal(out1, out2)
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), name


def test_four_dimensional_weight_is_accepted():
    tensors, kwargs = make_fused_inputs(CASES[0])
    weight4d = tensors["weight"][:, :, None, None]
    args = (tensors["input"], tensors["features"])
    torch.testing.assert_close(
        functional.fused_involution2d(*args, weight4d, tensors["bias"], **kwargs),
        functional.fused_involution2d(*args, tensors["weight"], tensors["bias"], **kwargs),
    )


def test_compile_fullgraph_and_autocast():
    torch._dynamo.reset()
    tensors, kwargs = make_fused_inputs(CASES[0], torch.float32)

    def fn(x, f, w, b):
        return functional.fused_involution2d(x.sin(), f, w, b, **kwargs).square().sum()

    compiled = torch.compile(fn, fullgraph=True)
    eager_leaves, compiled_leaves = _requires_grad(tensors), _requires_grad(tensors)
    eager = fn(*eager_leaves.values())
    eager.backward()
    result = compiled(*compiled_leaves.values())
    result.backward()
    torch.testing.assert_close(result, eager)
    for name, leaf in eager_leaves.items():
        torch.testing.assert_close(compiled_leaves[name].grad, leaf.grad)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = functional.fused_involution2d(*tensors.values(), **kwargs)
    assert out.dtype == torch.bfloat16
    assert_close_for(
        torch.bfloat16, out, functional.fused_involution2d(*tensors.values(), **kwargs)
    )


def test_opcheck():
    tensors, _ = make_fused_inputs(CASES[1], torch.float32)
    geometry = ([5, 5], [2, 2], [2, 2], [1, 1])
    args = tuple(t.requires_grad_() for t in tensors.values())
    torch.library.opcheck(_library.fused_involution, (*args, *geometry, "torch"))


def _native_test_backend() -> types.ModuleType:
    """A backend with fused passes, written as the composition over the portable backend, to
    exercise the op's native-pass path (its own op, autograd and layouts) on any machine."""
    module = types.ModuleType("fused_test_backend")
    module.forward, module.grad_input, module.grad_kernel = (
        portable.forward,
        portable.grad_input,
        portable.grad_kernel,
    )

    def fused_forward(input, features, weight, bias, kernel_size, stride, padding, dilation):
        kernel = span.span(features, weight, bias, math.prod(kernel_size))
        return portable.forward(input, kernel, kernel_size, stride, padding, dilation)

    def fused_backward(grad, input, features, weight, bias, kernel_size, stride, padding, dilation):
        kernel = span.span(features, weight, bias, math.prod(kernel_size))
        geometry = (kernel_size, stride, padding, dilation)
        gi = portable.grad_input(grad, kernel, input.shape[2:], *geometry)
        gk = portable.grad_kernel(grad, input, *geometry, kernel.shape[1])
        gf, gw, gb = span.span_backward(gk, features, weight, (True, True, True))
        return gi, gf, gw, gb

    module.fused_forward, module.fused_backward = fused_forward, fused_backward
    return module


def test_backends_listed_with_fused_passes_have_them(monkeypatch):
    """has_fused_passes() answers from a list before a lazy backend is imported, and from its
    module after: the two agree."""
    for name in dispatch._LAZY:
        monkeypatch.delitem(dispatch._IMPLEMENTATIONS, name, raising=False)
        listed = dispatch.has_fused_passes(name)
        module = dispatch.implementation(name)
        assert listed == hasattr(module, "fused_forward") == dispatch.has_fused_passes(name)
    assert not dispatch.has_fused_passes("reference")
    assert not dispatch.has_fused_passes("torch")


def test_native_fused_passes_are_used_and_match(monkeypatch):
    calls = []
    backend = _native_test_backend()
    original = backend.fused_backward

    def counting_backward(*args):
        calls.append("backward")
        return original(*args)

    backend.fused_backward = counting_backward
    monkeypatch.setitem(dispatch._IMPLEMENTATIONS, "native-test", backend)
    monkeypatch.setitem(dispatch._CAN_RUN, "native-test", dispatch.can_run_torch)
    for bias in (True, False):
        tensors, kwargs = make_fused_inputs(CASES[1], torch.float64, bias=bias)
        tensors = _requires_grad(tensors)
        out = functional.fused_involution2d(*tensors.values(), backend="native-test", **kwargs)
        grad_out = torch.randn_like(out)
        grads = _grads(out, tensors, grad_out)
        ref = composed_reference(2, *tensors.values(), kwargs)
        ref_grads = _grads(ref, tensors, grad_out)
        assert_close_for(torch.float64, out, ref)
        for name, grad in grads.items():
            assert_close_for(torch.float64, grad, ref_grads[name])
    assert calls == ["backward", "backward"]
    tensors, _ = make_fused_inputs(CASES[1], torch.float32)
    args = tuple(t.requires_grad_() for t in tensors.values())
    geometry = ([5, 5], [2, 2], [2, 2], [1, 1])
    torch.library.opcheck(_library.fused_involution, (*args, *geometry, "native-test"))


@pytest.mark.parametrize(
    "layer_case", [(2, 5, 1, "same"), (2, 3, 2, 0), (1, 5, 2, "same"), (3, 3, 1, 1)]
)
def test_layers_call_native_fused_passes_with_unchanged_outputs_and_grads(monkeypatch, layer_case):
    n, k, stride, padding = layer_case
    layer_class = {1: nn_module.Involution1d, 2: nn_module.Involution2d, 3: nn_module.Involution3d}
    torch.manual_seed(0)
    layer = layer_class[n](
        16, k, stride, padding, group_channels=4, out_channels=8, backend="torch"
    )
    layer = layer.double()
    x = torch.randn(2, 16, *(9, 8, 5)[:n], dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn_like(layer(x))

    def grads_of(out):
        params = [x, *layer.parameters()]
        return torch.autograd.grad(out, params, grad_out)

    geometry = (layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    composed = layer.proj(PLAIN[n](x, layer.generate_kernel(x), *geometry, backend="torch"))
    composed_grads = grads_of(composed)
    unfused = layer(x)  # the portable backend has no fused passes: span, then involution
    unfused_grads = grads_of(unfused)

    calls = []
    backend = _native_test_backend()
    fused_forward = backend.fused_forward
    backend.fused_forward = lambda *args: calls.append("forward") or fused_forward(*args)
    monkeypatch.setitem(dispatch._IMPLEMENTATIONS, "torch", backend)
    fused = layer(x)
    fused_grads = grads_of(fused)
    assert calls == ["forward"]
    torch.testing.assert_close(unfused, composed, rtol=0, atol=0)
    for a, b in zip(unfused_grads, composed_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_close_for(torch.float64, fused, unfused)
    for a, b in zip(fused_grads, unfused_grads, strict=True):
        assert_close_for(torch.float64, a, b)


def test_flop_count_is_the_same_through_the_fused_op(monkeypatch):
    from involution.models.flops import count_macs

    torch.manual_seed(0)
    layer = nn_module.Involution2d(32, 7, 2, group_channels=8, backend="torch")
    unfused = [count_macs(layer, (2, 32, 15, 14), elementwise) for elementwise in (True, False)]
    monkeypatch.setitem(dispatch._IMPLEMENTATIONS, "torch", _native_test_backend())
    fused = [count_macs(layer, (2, 32, 15, 14), elementwise) for elementwise in (True, False)]
    assert fused == unfused
    assert unfused[0] > unfused[1] > 0


def test_errors():
    tensors, kwargs = make_fused_inputs(CASES[0])
    x, f, w, b = tensors.values()
    fn = functional.fused_involution2d
    with pytest.raises(TypeError, match=r"features must be a torch.Tensor, got list"):
        fn(x, [1.0], w, b, **kwargs)
    with pytest.raises(TypeError, match=r"bias must be a torch.Tensor or None, got float"):
        fn(x, f, w, 1.0, **kwargs)
    with pytest.raises(ValueError, match=r"features must have 4 dimensions"):
        fn(x, f[0], w, b, **kwargs)
    with pytest.raises(TypeError, match=r"weight dtype \(torch.float32\) must match input"):
        fn(x, f, w.float(), b, **kwargs)
    with pytest.raises(ValueError, match=r"bias device \(meta\) must match input device"):
        fn(x, f, w, b.to("meta"), **kwargs)
    with pytest.raises(ValueError, match=r"weight shape \(18, 3, 3, 3\) must be"):
        fn(x, f, w[:, :, None, None].expand(18, 3, 3, 3), b, **kwargs)
    with pytest.raises(ValueError, match=r"weight shape \(17, 3\) must have groups \* 9 rows"):
        fn(x, f, w[:17], b[:17], **kwargs)
    with pytest.raises(ValueError, match=r"weight shape \(27, 3\) must have groups \* 9 rows"):
        fn(x, f, torch.cat([w, w[:9]]), b, **kwargs)  # 3 groups do not divide 8 channels
    with pytest.raises(ValueError, match=r"features shape \(2, 3, 9, 6\) does not fit"):
        fn(x, f[..., :6], w, b, **kwargs)
    with pytest.raises(ValueError, match=r"features shape \(2, 4, 9, 7\) does not fit"):
        fn(x, torch.cat([f, f[:, :1]], 1), w, b, **kwargs)
    with pytest.raises(ValueError, match=r"bias shape \(9,\) must be \(18,\)"):
        fn(x, f, w, b[:9], **kwargs)
    with pytest.raises(ValueError, match=r"backend \('bogus'\) must be 'auto' or one of"):
        fn(x, f, w, b, backend="bogus", **kwargs)

"""Memory formats: channels_last in gives channels_last out, on every backend and through models."""

from __future__ import annotations

import os

import pytest
import torch

from involution import Involution2d, create_model, functional
from involution.nn import _InvolutionNd
from involution.ops import layout
from involution.ops.dispatch import BACKENDS

from conftest import assert_close_for, make_inputs

FUNCS = {1: functional.involution1d, 2: functional.involution2d, 3: functional.involution3d}
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
LAYOUT_BACKENDS = [b for b in BACKENDS if b != "triton" or INTERPRETED]
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}

# (n, batch, channels, groups, size, kernel_size, stride, dilation)
CASES = [
    (1, 2, 6, 2, (11,), 3, 2, 1),
    (2, 2, 8, 2, (9, 7), 3, 1, 1),
    (2, 1, 6, 3, (10, 11), 5, 2, 2),
    (3, 1, 4, 2, (5, 6, 4), 3, 2, 1),
]


def _pixel_major(kernel: torch.Tensor) -> torch.Tensor:
    """The (B, G, T, *out) view of a channels-last span convolution's (B, G*T, *out) output."""
    b, g, t, *out = kernel.shape
    conv_out = kernel.reshape(b, g * t, *out).contiguous(memory_format=CHANNELS_LAST[len(out)])
    view = conv_out.view(b, g, t, *out)
    assert view.data_ptr() == conv_out.data_ptr()
    return view


def test_pixel_major_allocation_matches_the_span_view():
    x = torch.randn(2, 8, 5, 6).to(memory_format=torch.channels_last)
    kernel = layout.empty_kernel((2, 2, 9, 5, 6), x, pixel_major=True)
    assert _same_layout(kernel, _pixel_major(torch.randn(2, 2, 9, 5, 6)))
    assert layout.channels_last(x) and not layout.channels_last(x.contiguous())
    # One channel: both layouts at once, which counts as contiguous.
    assert not layout.channels_last(torch.randn(2, 1, 4, 4).to(memory_format=torch.channels_last))


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same strides wherever they matter (dimensions of size > 1)."""
    return a.shape == b.shape and all(
        sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape, strict=True) if n > 1
    )


@pytest.mark.parametrize("backend", LAYOUT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-k{c[5]}-s{c[6]}")
def test_channels_last_values_and_layouts(backend, dtype, case):
    n, b, c, g, size, k, s, d = case
    x, w, kwargs = make_inputs(n, b, c, g, size, k, s, d, dtype=dtype)
    if n > 1:
        x = x.contiguous(memory_format=CHANNELS_LAST[n])
        w = _pixel_major(w)
    x.requires_grad_()
    w.requires_grad_()
    out = FUNCS[n](x, w, backend=backend, **kwargs)
    grad_out = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), grad_out)

    x64 = x.detach().double().contiguous().requires_grad_()
    w64 = w.detach().double().contiguous().requires_grad_()
    ref = FUNCS[n](x64, w64, backend="reference", **kwargs)
    rx, rw = torch.autograd.grad(ref, (x64, w64), grad_out.double().contiguous())
    assert_close_for(dtype, out, ref)
    assert_close_for(dtype, gx, rx)
    assert_close_for(dtype, gw, rw)
    if n > 1:
        fmt = CHANNELS_LAST[n]
        assert out.is_contiguous(memory_format=fmt), out.stride()
        assert gx.is_contiguous(memory_format=fmt), gx.stride()
        assert _same_layout(gw, w), (gw.stride(), w.stride())
    else:
        assert out.is_contiguous() and gx.is_contiguous()


@pytest.mark.parametrize("backend", LAYOUT_BACKENDS)
def test_contiguous_stays_contiguous(backend):
    x, w, kwargs = make_inputs(2, 2, 8, 2, (7, 6), 3, 2, 1, dtype=torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    out = functional.involution2d(x, w, backend=backend, **kwargs)
    gx, gw = torch.autograd.grad(out, (x, w), torch.randn_like(out))
    assert out.is_contiguous() and gx.is_contiguous() and gw.is_contiguous()


@pytest.mark.parametrize("backend", LAYOUT_BACKENDS)
def test_grad_input_follows_input_when_grad_out_does_not(backend):
    x, w, kwargs = make_inputs(2, 1, 4, 2, (6, 5), 3, dtype=torch.float32)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = functional.involution2d(x, w, backend=backend, **kwargs)
    (gx,) = torch.autograd.grad(out, x, torch.randn(out.shape))  # contiguous grad_out
    assert gx.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_rednet_keeps_its_format_in_every_involution_layer():
    model = create_model("rednet26_cifar", num_classes=3, base_width=16)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    seen = []

    def check(module, args, output):
        seen.append(module)
        assert output.is_contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            features = module.kernel_features(args[0])
            kernel = module.generate_kernel(args[0])
        assert features.is_contiguous(memory_format=torch.channels_last)
        assert kernel.permute(0, 3, 4, 1, 2).is_contiguous()  # pixel-major: a view, no copy

    layers = [m for m in model.modules() if isinstance(m, _InvolutionNd)]
    for layer in layers:
        layer.register_forward_hook(check)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    assert len(layers) > 0 and seen == layers


@pytest.mark.parametrize("hidden", [4, 32])  # under 16: the norm runs on an NCHW copy
def test_kernel_features_channels_last_match_nchw_in_training(hidden):
    """Values, every gradient and the norm's running statistics, as in NCHW."""
    torch.manual_seed(0)
    layers = [Involution2d(4 * hidden, 3, reduction_ratio=4) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(3, 4 * hidden, 6, 5)
    grad = torch.randn(3, hidden, 6, 5)
    results = []
    for layer, fmt in zip(layers, (torch.contiguous_format, torch.channels_last), strict=True):
        xi = x.clone(memory_format=fmt).requires_grad_()
        features = layer.kernel_features(xi)
        assert layout.memory_format(features) == fmt
        features.backward(grad.contiguous(memory_format=fmt))
        results.append(
            [features, xi.grad, *(p.grad for p in layer.parameters() if p.grad is not None)]
        )
        results[-1] += [layer.norm.running_mean, layer.norm.running_var]
    assert len(results[0]) == 7  # features; x, reduce, norm weight and bias; the statistics
    for nchw, cl in zip(*results, strict=True):
        assert_close_for(torch.float32, cl, nchw)


def test_opcheck_channels_last():
    """The fake implementations give the strides the real ones do (checked by opcheck)."""
    from involution.ops import _library

    x, w, _ = make_inputs(2, 2, 4, 2, (7, 6), 3, 2, 1, dtype=torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    w = _pixel_major(w)
    g = torch.randn(2, 4, 4, 3).contiguous(memory_format=torch.channels_last)
    geometry = ([3, 3], [2, 2], [1, 1], [1, 1])
    samples = [
        (_library.involution, (x.requires_grad_(), w.requires_grad_(), *geometry, "torch")),
        (_library.grad_input, (g, w.detach(), [7, 6], *geometry, "torch")),
        (_library.grad_kernel, (g, x.detach(), *geometry, 2, "torch")),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)

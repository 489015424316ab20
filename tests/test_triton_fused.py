"""The fused Triton kernels (``ops/triton/fused_kernels.py``) against the float64 composition.

CPU tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set by ``make test``)
on small shapes chosen to cover several tiles and a partial one, chunks of channels and of
hidden features, chunks of d_weight's partial sums, strides, dilations, paddings, odd sizes,
1D and 3D, and every layout. The ``gpu`` test runs RedNet-50's layer shapes on CUDA.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from involution import functional
from involution.functional import output_size, resolve_geometry
from involution.ops import _library, span
from test_fused import composed_reference

triton = pytest.importorskip(
    "triton", reason="triton is not installed (pip install 'involution[triton]')"
)
from involution.ops.triton import fused_launch, launch  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The kernel checks run in the interpreter on the CPU, or compiled on a GPU when there is one
# and no interpreter.
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED and DEVICE == "cpu",
    reason="Triton kernels need TRITON_INTERPRET=1 on the CPU, or a CUDA device",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FUSED = {
    1: functional.fused_involution1d,
    2: functional.fused_involution2d,
    3: functional.fused_involution3d,
}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# (rtol, atol / max |reference|) against the float64 composition, per dtype. 16-bit results are
# rounded once from float32 sums, and the kernel gradient is rounded to the input dtype before
# its tensor-core products, as the unfused layer stores it.
TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (3e-2, 1.6e-2),
}
NAMES = ("out", "input", "features", "weight", "bias")

# (n, batch, channels, groups, hidden, size, kernel_size, stride, padding, dilation)
CASES = {
    # 126 pixels: four tiles of 32 (the interpreter's) and a partial one.
    "2d-k3": (2, 2, 8, 2, 3, (9, 7), 3, 1, None, 1),
    "2d-odd-k5-s2": (2, 1, 6, 3, 4, (10, 11), 5, 2, None, 1),
    # 20 hidden features: two chunks of 16; 6 channels per group: two chunks of 4, one partial.
    "2d-chunks-d2-s3": (2, 2, 12, 2, 20, (8, 9), 3, 3, None, 2),
    "2d-anisotropic": (2, 1, 6, 2, 5, (7, 9), (3, 5), (1, 2), (0, 3), (2, 1)),
    "1d-k5-s2": (1, 2, 6, 2, 3, (13,), 5, 2, None, 1),
    "3d-k3-s2": (3, 1, 4, 2, 2, (5, 6, 4), 3, 2, None, 1),
}
# One tile: for the tests of layouts, bias, offsets and registration.
SMALL = (2, 1, 4, 2, 3, (6, 5), 3, 2, None, 1)
# Enough pixels to split d_weight into chunks of partial sums: 72 in the interpreter (three tiles
# of 32), 1152 compiled (18 tiles of 64, in chunks of at least 8).
CHUNKED = (2, 2, 4, 2, 3, (6, 6) if DEVICE == "cpu" else (24, 24), 3, 1, None, 1)


@pytest.fixture(autouse=True)
def _float32_in_full_precision(monkeypatch):
    """On a GPU, float32 products in full precision (no tf32), as the tolerances assume."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def make_inputs(case, dtype, bias=True, seed=0):
    n, batch, channels, groups, hidden, size, k, s, p, d = case
    gen = torch.Generator().manual_seed(seed)
    geometry = resolve_geometry(n, k, s, p, d)
    out = output_size(size, *geometry)
    taps = math.prod(geometry[0])

    def rand(*shape, scale=1.0):
        values = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return values.to(device=DEVICE, dtype=dtype)

    tensors = {
        "input": rand(batch, channels, *size),
        "features": rand(batch, hidden, *out),
        "weight": rand(groups * taps, hidden, scale=hidden**-0.5),
        "bias": rand(groups * taps) if bias else None,
    }
    grad_out = rand(batch, channels, *out)
    return tensors, grad_out, {"kernel_size": k, "stride": s, "padding": p, "dilation": d}


def run(n, tensors, grad_out, kwargs, backend="triton"):
    """Output and gradients of the fused op, in NAMES order (None where a tensor is None)."""
    leaves = {k: None if t is None else t.detach().requires_grad_() for k, t in tensors.items()}
    out = FUSED[n](*leaves.values(), backend=backend, **kwargs)
    present = [t for t in leaves.values() if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out))
    return [out, *(None if t is None else next(grads) for t in leaves.values())]


def reference(n, tensors, grad_out, kwargs):
    leaves = {
        k: None if t is None else t.detach().double().requires_grad_() for k, t in tensors.items()
    }
    out = composed_reference(n, *leaves.values(), kwargs)
    present = [t for t in leaves.values() if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out.double()))
    return [out, *(None if t is None else next(grads) for t in leaves.values())]


def assert_matches(dtype, got, want):
    rtol, scale = TOLERANCES[dtype]
    for name, a, b in zip(NAMES, got, want, strict=True):
        if b is None:
            continue
        assert a.dtype == dtype, name
        assert a.shape == b.shape, name
        atol = scale * b.abs().max().item()
        torch.testing.assert_close(
            a.double(), b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


# Every case in float32; the 16-bit types (the same kernels, other roundings) on a share each,
# to keep the interpreter's time down.
DTYPE_CASES = [
    *((case, torch.float32) for case in CASES),
    *(
        (case, torch.bfloat16)
        for case in ("2d-odd-k5-s2", "2d-chunks-d2-s3", "1d-k5-s2", "3d-k3-s2")
    ),
    *((case, torch.float16) for case in ("2d-k3", "2d-anisotropic")),
]


@needs_interpreter
@pytest.mark.parametrize(("case", "dtype"), DTYPE_CASES, ids=str)
def test_matches_float64_composition(case, dtype):
    n = CASES[case][0]
    tensors, grad_out, kwargs = make_inputs(CASES[case], dtype)
    if n > 1:  # the layout of RedNet's layers; NCHW has a test of its own
        for key in ("input", "features"):
            tensors[key] = tensors[key].contiguous(memory_format=CHANNELS_LAST[n + 2])
    assert_matches(
        dtype, run(n, tensors, grad_out, kwargs), reference(n, tensors, grad_out, kwargs)
    )


def _strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a tensor that is neither contiguous nor channels-last."""
    wider = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wider[..., ::2] = t
    return wider[..., ::2]


@needs_interpreter
@pytest.mark.parametrize(
    ("input_layout", "features_layout"),
    [
        ("contiguous", "contiguous"),
        ("channels_last", "contiguous"),
        ("contiguous", "channels_last"),
        ("strided", "strided"),
    ],
)
def test_layouts_are_read_by_strides_and_kept(input_layout, features_layout):
    tensors, grad_out, kwargs = make_inputs(SMALL, torch.float32)
    convert = {
        "contiguous": lambda t: t.contiguous(),
        "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
        "strided": _strided,
    }
    tensors["input"] = convert[input_layout](tensors["input"])
    tensors["features"] = convert[features_layout](tensors["features"])
    tensors["weight"] = _strided(tensors["weight"])
    grad_out = convert[input_layout](grad_out)
    got = run(2, tensors, grad_out, kwargs)
    assert_matches(torch.float32, got, reference(2, tensors, grad_out, kwargs))
    out, grad_input, grad_features = got[:3]
    input_cl = input_layout == "channels_last"
    assert out.is_contiguous(memory_format=torch.channels_last) == input_cl
    assert grad_input.is_contiguous(memory_format=torch.channels_last) == input_cl
    features_cl = features_layout == "channels_last"
    assert grad_features.is_contiguous(memory_format=torch.channels_last) == features_cl
    assert (out.is_contiguous() or input_cl) and (grad_features.is_contiguous() or features_cl)


@needs_interpreter
@pytest.mark.parametrize("case", [SMALL, CASES["3d-k3-s2"]], ids=["2d", "3d"])
def test_without_bias(case):
    tensors, grad_out, kwargs = make_inputs(case, torch.float32, bias=False)
    n = case[0]
    assert_matches(
        torch.float32, run(n, tensors, grad_out, kwargs), reference(n, tensors, grad_out, kwargs)
    )


@needs_interpreter
def test_batch_zero_gives_empty_results_and_zero_parameter_gradients():
    case = (2, 0, 8, 2, 3, (9, 7), 3, 1, None, 1)
    tensors, grad_out, kwargs = make_inputs(case, torch.float32)
    out, grad_input, grad_features, grad_weight, grad_bias = run(2, tensors, grad_out, kwargs)
    assert out.shape == (0, 8, 9, 7)
    assert grad_input.shape == tensors["input"].shape
    assert grad_features.shape == tensors["features"].shape
    assert grad_weight.shape == tensors["weight"].shape and not grad_weight.any()
    assert grad_bias.shape == tensors["bias"].shape and not grad_bias.any()


@needs_interpreter
def test_two_runs_are_bit_identical():
    tensors, grad_out, kwargs = make_inputs(CHUNKED, torch.float32)
    # Several chunks of tiles, so that d_weight is reduced from several partial sums.
    assert fused_launch.weight_chunks(pixels=2 * math.prod(CHUNKED[5]), groups=2) > 1
    first, second = run(2, tensors, grad_out, kwargs), run(2, tensors, grad_out, kwargs)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), name


@needs_interpreter
def test_native_passes_run_and_the_kernel_is_never_generated(monkeypatch):
    calls = []
    for name in ("fused_forward", "fused_backward"):
        original = getattr(launch, name)

        def counted(*args, _name=name, _original=original):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(launch, name, counted)

    def forbidden(*args, **kwargs):
        raise AssertionError("the composition's span ran: the kernel was generated")

    monkeypatch.setattr(span, "span", forbidden)
    tensors, grad_out, kwargs = make_inputs(CASES["1d-k5-s2"], torch.float32)
    got = run(1, tensors, grad_out, kwargs)
    assert calls == ["fused_forward", "fused_backward"]
    monkeypatch.undo()
    assert_matches(torch.float32, got, reference(1, tensors, grad_out, kwargs))


@needs_interpreter
def test_64_bit_offsets(monkeypatch):
    """The WIDE variant (int64 pixel indices and offsets, for tensors of 2**31 elements and more,
    too large for a test) gives the same results as the 32-bit one."""
    tensors, grad_out, kwargs = make_inputs(CHUNKED, torch.float32)
    monkeypatch.setattr(fused_launch, "_PLANS", {})
    narrow = run(2, tensors, grad_out, kwargs)
    monkeypatch.setattr(fused_launch, "_wide", lambda *args: True)
    monkeypatch.setattr(fused_launch, "_PLANS", {})  # planned again, now wide
    wide = run(2, tensors, grad_out, kwargs)
    planned = [p.constexprs["WIDE"] for plans in fused_launch._PLANS.values() for p in plans]
    assert planned == [True] * 4
    for name, a, b in zip(NAMES, narrow, wide, strict=True):
        assert torch.equal(a, b), name


@needs_interpreter
def test_plans_are_reused_with_new_tensors_and_keyed_by_alignment(monkeypatch):
    """A known call signature reuses its launch plans with the new call's tensors (not the
    first call's); a tensor whose data starts off the 16-byte boundary gets plans of its own."""
    monkeypatch.setattr(fused_launch, "_PLANS", {})
    first, grad_out, kwargs = make_inputs(SMALL, torch.float32, seed=0)
    run(2, first, grad_out, kwargs)
    assert len(fused_launch._PLANS) == 2  # the forward's and the backward's
    second, grad_out, _ = make_inputs(SMALL, torch.float32, seed=1)
    got = run(2, second, grad_out, kwargs)
    assert len(fused_launch._PLANS) == 2
    assert_matches(torch.float32, got, reference(2, second, grad_out, kwargs))
    x = second["input"]
    shifted = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view_as(x).copy_(x)
    assert shifted.data_ptr() % 16 != 0
    second["input"] = shifted
    got = run(2, second, grad_out, kwargs)
    assert len(fused_launch._PLANS) == 4
    assert_matches(torch.float32, got, reference(2, second, grad_out, kwargs))


@needs_interpreter
@pytest.mark.parametrize("pixels", [1, 31, 32, 33, 1000, 10**6])
@pytest.mark.parametrize("groups", [1, 4, 32])
def test_weight_chunks_cover_the_tiles_with_none_empty(pixels, groups):
    tiles = triton.cdiv(pixels, fused_launch._BLOCK_P)
    chunks = fused_launch.weight_chunks(pixels, groups)
    per_chunk = triton.cdiv(tiles, chunks)
    assert 1 <= chunks <= tiles
    assert (chunks - 1) * per_chunk < tiles <= chunks * per_chunk


@needs_interpreter
def test_opcheck_native_passes():
    """The op's fake implementations match the kernels' shapes and strides (channels_last in,
    channels_last out), and its registered autograd calls the native backward."""
    tensors, _, kwargs = make_inputs(SMALL, torch.float32)
    tensors["input"] = tensors["input"].contiguous(memory_format=torch.channels_last)
    geometry = resolve_geometry(2, kwargs["kernel_size"], kwargs["stride"], None, 1)
    args = tuple(t.requires_grad_() for t in tensors.values())
    torch.library.opcheck(_library.fused_involution, (*args, *map(list, geometry), "triton"))


@needs_interpreter
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    tensors, grad_out, kwargs = make_inputs(SMALL, torch.float32)

    def fn(x, f, w, b):
        return functional.fused_involution2d(x, f, w, b, backend="triton", **kwargs)

    eager = run(2, tensors, grad_out, kwargs)
    leaves = [t.detach().requires_grad_() for t in tensors.values()]
    out = torch.compile(fn, fullgraph=True)(*leaves)
    compiled = [out, *torch.autograd.grad(out, leaves, grad_out)]
    for name, a, b in zip(NAMES, compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@needs_interpreter
def test_float64_is_refused_with_the_reason():
    tensors, _, kwargs = make_inputs(CASES["2d-k3"], torch.float64)
    with pytest.raises(RuntimeError, match=r"triton: input dtype torch.float64 is not supported"):
        functional.fused_involution2d(*tensors.values(), backend="triton", **kwargs)


# RedNet-50's involution layers: (channels, size, kernel_size, stride), 16 channels per group.
REDNET_LAYERS = [(32, 112, 3, 1), (64, 56, 7, 1), (128, 56, 7, 2), (512, 7, 7, 1)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layer", REDNET_LAYERS, ids=str)
def test_rednet_shapes_on_cuda(layer, dtype, monkeypatch):
    """Two images at each layer's shape, channels_last; float32 in full precision (tf32 off),
    and a second run bit-identical to the first."""
    channels, size, k, stride = layer
    case = (2, 2, channels, channels // 16, channels // 4, (size, size), k, stride, None, 1)
    tensors, grad_out, kwargs = make_inputs(case, dtype)
    tensors = {key: t.cuda() for key, t in tensors.items()}
    for key in ("input", "features"):
        tensors[key] = tensors[key].contiguous(memory_format=torch.channels_last)
    grad_out = grad_out.cuda().contiguous(memory_format=torch.channels_last)
    got = run(2, tensors, grad_out, kwargs)
    want = reference(2, tensors, grad_out, kwargs)
    # The GPU's float32 dots are the accumulation order's only difference: a looser rtol.
    rtol, scale = TOLERANCES[dtype]
    for name, a, b in zip(NAMES, got, want, strict=True):
        atol = scale * b.abs().max().item()
        torch.testing.assert_close(
            a.double(), b, rtol=max(rtol, 1e-4), atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )
    again = run(2, tensors, grad_out, kwargs)
    for name, a, b in zip(NAMES, got, again, strict=True):
        assert torch.equal(a, b), name

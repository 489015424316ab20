"""The Triton backend against the reference, under Triton's interpreter and on CUDA.

CPU tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set by ``make test``)
on small shapes, in both layouts the kernels serve: ``contiguous`` (NCHW input, contiguous
kernel; the strided path) and ``channels_last`` (channels-last input and grad_out, pixel-major
kernel; the vector path), in 1D, 2D and 3D, and mixed or strided layouts. The ``gpu`` tests
run the same checks at RedNet-50's layer shapes on CUDA, and capture the op in a CUDA graph, by
hand and through ``torch.compile(mode="reduce-overhead")``. Every comparison is against the
reference backend in float64 on the same (rounded) inputs. The Triton kernels take no float64
(they accumulate in float32), so their tolerance table here starts at float32; it is tighter
than ``conftest.TOLERANCES`` for the half types, whose outputs are rounded once from a float32
accumulator.
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
from involution.ops.triton import launch, plan  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The kernel checks run in the interpreter on the CPU, or compiled on a GPU when there is one
# and no interpreter.
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED and DEVICE == "cpu",
    reason="Triton kernels need TRITON_INTERPRET=1 on the CPU, or a CUDA device",
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
LAYOUTS = ("contiguous", "channels_last")


def channels_innermost(t: torch.Tensor, leading: int) -> torch.Tensor:
    """``t`` stored with dimensions 1 .. leading-1 innermost: a channels-last input
    (``leading`` = 2; torch's channels_last / channels_last_3d in 2D / 3D, and the (B, L, C)
    storage in 1D) or a pixel-major kernel (``leading`` = 3)."""
    order = (0, *range(leading, t.dim()), *range(1, leading))
    stored = t.permute(order).contiguous()
    return stored.permute(sorted(range(t.dim()), key=order.__getitem__))


def make_case(
    n,
    batch,
    channels,
    groups,
    size,
    kernel_size,
    stride,
    dilation,
    padding,
    dtype,
    device,
    layout="contiguous",
):
    gen = torch.Generator().manual_seed(batch * 1000 + channels * 10 + n)
    geometry = resolve_geometry(n, kernel_size, stride, padding, dilation)
    out = output_size(size, *geometry)
    x = torch.randn(batch, channels, *size, generator=gen, dtype=torch.float64)
    w = torch.randn(batch, groups, math.prod(geometry[0]), *out, generator=gen, dtype=torch.float64)
    g = torch.randn(batch, channels, *out, generator=gen, dtype=torch.float64)
    x, w, g = (t.to(device=device, dtype=dtype) for t in (x, w, g))
    if layout == "channels_last":
        x, w, g = channels_innermost(x, 2), channels_innermost(w, 3), channels_innermost(g, 2)
    kwargs = {
        "kernel_size": kernel_size,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
    }
    return (x, w, g), kwargs


def forward_and_grads(fn, x, w, g, backend, **kwargs):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = fn(x, w, backend=backend, **kwargs)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    return y.detach(), gx, gw


def assert_close_to_reference(n, dtype, got, x, w, g, **kwargs):
    fn = FUNCTIONS[n]
    expected = forward_and_grads(fn, x.double(), w.double(), g.double(), "reference", **kwargs)
    rtol, atol = TOLERANCES[dtype]
    for name, a, b in zip(("output", "grad_input", "grad_kernel"), got, expected, strict=True):
        assert a.dtype == dtype, name
        assert a.shape == b.shape, name
        torch.testing.assert_close(
            a.double(), b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


def assert_matches_reference(n, dtype, device, *case, layout="contiguous"):
    (x, w, g), kwargs = make_case(n, *case, dtype=dtype, device=device, layout=layout)
    got = forward_and_grads(FUNCTIONS[n], x, w, g, "triton", **kwargs)
    assert_close_to_reference(n, dtype, got, x, w, g, **kwargs)
    # Results come back in the layout the input came in, straight from the kernels.
    y, gx, gw = got
    if n > 1:
        for name, result, like in (("output", y, g), ("grad_input", gx, x), ("grad_kernel", gw, w)):
            assert same_layout(result, like), (name, result.stride(), like.stride())


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same strides wherever they matter (dimensions of size > 1)."""
    return all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape, strict=True) if n > 1)


# (batch, channels, groups, size, kernel_size, stride, dilation, padding)
CASES_2D = [
    (2, 8, 2, (9, 7), 3, 1, 1, None),  # groups, odd sizes
    (1, 6, 3, (11, 10), 5, 2, 1, None),  # stride 2, 2 channels per group
    (2, 5, 1, (8, 9), 3, 3, 2, None),  # stride 3, dilation 2, 5 channels: two channel chunks
    (1, 4, 4, (7, 13), 3, 2, 1, 0),  # one channel per group, no padding
    (1, 3, 1, (6, 7), (3, 5), (2, 1), (1, 2), None),  # rectangular kernel, mixed geometry
    (1, 2, 1, (10, 11), 9, 1, 1, None),  # K = 9
    (1, 3, 1, (5, 6), 2, 1, 1, 1),  # even kernel with explicit padding
]


@needs_interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES_2D, ids=str)
def test_2d_float32(case, layout):
    assert_matches_reference(2, torch.float32, DEVICE, *case, layout=layout)


@needs_interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES_2D[:2], ids=str)
def test_2d_reduced_precision(case, dtype, layout):
    assert_matches_reference(2, dtype, DEVICE, *case, layout=layout)


@needs_interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_1d(dtype, layout):
    assert_matches_reference(1, dtype, DEVICE, 2, 6, 2, (13,), 5, 2, 1, None, layout=layout)


@needs_interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
def test_3d(layout):
    case = (1, 4, 2, (5, 6, 7), 3, (1, 2, 1), 1, None)
    assert_matches_reference(3, torch.float32, DEVICE, *case, layout=layout)


@needs_interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_3d_reduced_precision(dtype, layout):
    """Half-precision loads and stores in 3D (channels_last_3d and pixel-major in one of the
    layouts), with a dilation along one axis."""
    case = (1, 4, 2, (3, 4, 5), 3, 1, (1, 1, 2), None)
    assert_matches_reference(3, dtype, DEVICE, *case, layout=layout)


@needs_interpreter
@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_zero(layout):
    assert_matches_reference(
        2, torch.float32, DEVICE, 0, 4, 2, (5, 5), 3, 1, 1, None, layout=layout
    )


def _gpu_rule(monkeypatch):
    """Makes the launcher pick the configurations it picks on a GPU (lanes per program,
    channels per chunk, strip length), so that the interpreter runs those."""
    monkeypatch.setattr(launch, "_INTERPRETED", False)
    monkeypatch.setattr(launch, "MAX_BLOCK_C", 16)
    monkeypatch.setattr(launch, "_PLANS", {})


@needs_interpreter
@pytest.mark.parametrize("rows", launch.STRIP_ROWS)
def test_every_gpu_config(rows, monkeypatch):
    """Each strip length the rule may pick, forced, with the GPU's lanes and chunks, in both
    layouts, in float32 and bfloat16 (whose vectors hold twice the channels)."""
    _gpu_rule(monkeypatch)
    monkeypatch.setattr(launch, "strip_rows", lambda height: rows)
    cases = [
        (2, torch.float32, (1, 32, 2, (9, 8), 3, 1, 1, None)),  # 16 channels per group
        (2, torch.bfloat16, (1, 32, 2, (9, 8), 3, 1, 1, None)),
        (2, torch.float32, (1, 20, 1, (7, 9), 5, 2, 1, None)),  # 20 channels: two chunks
        (3, torch.float32, (1, 8, 2, (4, 5, 6), 3, (1, 2, 1), 1, None)),
    ]
    for layout in LAYOUTS:
        for n, dtype, case in cases:
            assert_matches_reference(n, dtype, DEVICE, *case, layout=layout)


@needs_interpreter
def test_mixed_and_strided_layouts():
    """Any layout of any tensor: channels-last input with a contiguous kernel, a contiguous
    input with a pixel-major kernel and a channels-last grad_out, and views that are neither."""
    (x, w, g), kwargs = make_case(2, 2, 8, 2, (9, 7), 3, 1, 1, None, torch.float32, DEVICE)
    x_cl, w_pm, g_cl = channels_innermost(x, 2), channels_innermost(w, 3), channels_innermost(g, 2)
    x_view = torch.cat([x, x], dim=-1)[..., ::2]  # every other column
    w_view = torch.cat([w, w], dim=1)[:, ::2]  # every other group
    for xi, wi, gi in ((x_cl, w, g), (x, w_pm, g_cl), (x_view, w_view, g)):
        got = forward_and_grads(involution2d, xi, wi, gi, "triton", **kwargs)
        assert_close_to_reference(2, torch.float32, got, xi, wi, gi, **kwargs)


@needs_interpreter
def test_unaligned_storage_gets_its_own_plan(monkeypatch):
    """A tensor whose data starts off the 16-byte boundary is not served by the compiled
    kernel of an aligned one (Triton specializes on pointer alignment)."""
    monkeypatch.setattr(launch, "_PLANS", {})
    (x, w, g), kwargs = make_case(2, 1, 8, 2, (6, 5), 3, 1, 1, None, torch.float32, DEVICE)
    forward_and_grads(involution2d, x, w, g, "triton", **kwargs)
    plans = len(launch._PLANS)
    shifted = torch.empty(x.numel() + 1, device=x.device)[1:].view_as(x).copy_(x)
    assert shifted.data_ptr() % 16 != 0
    got = forward_and_grads(involution2d, shifted, w, g, "triton", **kwargs)
    assert len(launch._PLANS) == plans + 2  # forward and grad_kernel read the input
    assert_close_to_reference(2, torch.float32, got, shifted, w, g, **kwargs)


@needs_interpreter
def test_known_shapes_reuse_their_plan(monkeypatch):
    monkeypatch.setattr(launch, "_PLANS", {})
    (x, w, g), kwargs = make_case(2, 1, 4, 2, (6, 5), 3, 1, 1, None, torch.float32, DEVICE)
    forward_and_grads(involution2d, x, w, g, "triton", **kwargs)
    assert len(launch._PLANS) == 3
    forward_and_grads(involution2d, x + 1, w, g, "triton", **kwargs)
    assert len(launch._PLANS) == 3


def test_plan_calls_the_compiled_kernel_with_every_parameter_and_a_3d_grid():
    """After its first launch a plan calls the compiled kernel directly: the launcher then
    takes a grid of three sizes and every parameter in signature order, constants included.
    Checked with a stand-in for the JIT function and its compiled kernel (no GPU needed)."""
    runs = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: runs.append((grid, args))

    class Kernel:
        arg_names = ["x", "y", "n", "m", "A", "B"]

        def __getitem__(self, grid):
            def jit(*args, **kwargs):
                runs.append((grid, (*args, kwargs)))
                return Compiled()

            return jit

    planned = plan.Plan(Kernel(), (7,), (3, 4), {"B": 2, "A": 1}, num_warps=4)
    planned.launch("x1", "y1")
    planned.launch("x2", "y2")
    assert runs[0] == ((7, 1, 1), ("x1", "y1", 3, 4, {"B": 2, "A": 1, "num_warps": 4}))
    assert runs[1] == ((7, 1, 1), ("x2", "y2", 3, 4, 1, 2))


@needs_interpreter
def test_plans_are_keyed_by_everything_they_depend_on(monkeypatch):
    """Calls that share some of their tensors' shapes but not all, or the shapes but not the
    strides, each get a plan of their own and the right results, whatever ran before them."""
    monkeypatch.setattr(launch, "_PLANS", {})
    calls = [
        # Inputs of 11 and 12 rows give the same 6x6 output and kernel at stride 2: the input
        # gradient's plan differs only by the size of what it writes.
        (2, 2, 4, 2, (11, 11), 3, 2, 1, None, "contiguous"),
        (2, 2, 4, 2, (12, 12), 3, 2, 1, None, "contiguous"),
        # Same input and grad_out, 2 or 4 groups: the kernel gradient differs by what it writes.
        (2, 1, 8, 4, (6, 5), 3, 1, 1, None, "contiguous"),
        (2, 1, 8, 2, (6, 5), 3, 1, 1, None, "contiguous"),
        # Same shapes, other strides.
        (2, 1, 8, 2, (6, 5), 3, 1, 1, None, "channels_last"),
    ]
    for n, *case, layout_name in calls:
        (x, w, g), kwargs = make_case(n, *case, torch.float32, DEVICE, layout_name)
        got = forward_and_grads(FUNCTIONS[n], x, w, g, "triton", **kwargs)
        assert_close_to_reference(n, torch.float32, got, x, w, g, **kwargs)
    assert len(launch._PLANS) == 3 * len(calls)


def _plan_of(monkeypatch, op, x, w, g, geometry, groups):
    """The launch plan of one op, captured instead of launched."""
    captured = []
    monkeypatch.setattr(launch, "_PLANS", {})
    monkeypatch.setattr(plan.Plan, "launch", lambda self, *tensors: captured.append(self))
    if op == "forward":
        launch.forward(x, w, *geometry)
    elif op == "grad_input":
        launch.grad_input(g, w, x.shape[2:], *geometry)
    else:
        launch.grad_kernel(g, x, *geometry, groups)
    return captured[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rule_vectorizes_channels_last(dtype, monkeypatch):
    """On a GPU a RedNet layer (16 channels per group) takes the vector path in channels_last:
    16-byte vectors along channels, and as many lanes as fill 4 warps; NCHW takes the strided
    path with one lane per thread. Checked on meta tensors: nothing runs."""
    _gpu_rule(monkeypatch)
    geometry = ([7, 7], [1, 1], [3, 3], [1, 1])
    for op in ("forward", "grad_input", "grad_kernel"):
        x = torch.empty(8, 64, 14, 14, device="meta", dtype=dtype)
        w = torch.empty(8, 4, 49, 14, 14, device="meta", dtype=dtype)
        g = torch.empty(8, 64, 14, 14, device="meta", dtype=dtype)
        nchw = _plan_of(monkeypatch, op, x, w, g, geometry, 4).constexprs
        assert (nchw["CL"], nchw["ALIGN"], nchw["TAPS_INNER"], nchw["BLOCK_P"]) == (
            False,
            1,
            False,
            128,
        )
        x, w, g = channels_innermost(x, 2), channels_innermost(w, 3), channels_innermost(g, 2)
        got = _plan_of(monkeypatch, op, x, w, g, geometry, 4).constexprs
        vector = 16 // dtype.itemsize
        expected = (True, 16, True, 128 * vector // 16, 2)
        assert (got["CL"], got["ALIGN"], got["TAPS_INNER"], got["BLOCK_P"], got["ROWS"]) == expected


def test_rule_alignment_follows_the_strides(monkeypatch):
    """Odd channel counts leave channel rows unaligned: the vector path then takes the
    alignment their offsets have (2 elements here: 6 channels, 2 per group)."""
    _gpu_rule(monkeypatch)
    x = channels_innermost(torch.empty(2, 6, 5, 5, device="meta"), 2)
    w = channels_innermost(torch.empty(2, 3, 9, 5, 5, device="meta"), 3)
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1])
    found = _plan_of(monkeypatch, "forward", x, w, None, geometry, 3).constexprs
    assert (found["CL"], found["ALIGN"], found["BLOCK_C"], found["BLOCK_P"]) == (True, 2, 2, 128)


def test_offsets_past_32_bits_are_refused():
    x = torch.empty(1, 2, 4, 4, device="meta").as_strided((1, 2, 4, 4), (2**32, 2**31, 4, 1))
    w = torch.empty(1, 1, 9, 4, 4, device="meta")
    with pytest.raises(RuntimeError, match=r"32-bit offsets \(expected < 2\*\*31\)"):
        launch.forward(x, w, [3, 3], [1, 1], [1, 1], [1, 1])


@needs_interpreter
def test_deterministic():
    (x, w, g), kwargs = make_case(2, 1, 6, 3, (11, 10), 5, 2, 1, None, torch.float32, DEVICE)
    first = forward_and_grads(involution2d, x, w, g, "triton", **kwargs)
    second = forward_and_grads(involution2d, x, w, g, "triton", **kwargs)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_autocast_runs_in_low_precision(backend):
    (x, w, g), kwargs = make_case(2, 2, 8, 2, (9, 7), 3, 1, 1, None, torch.float32, DEVICE)
    x = x.requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
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
    assert dispatch.choose_backend(x, w, "auto") in ("cpu", "torch")  # never triton on the CPU


def test_refusals_explain_themselves(monkeypatch):
    x, w = torch.randn(1, 4, 5, 5), torch.randn(1, 2, 9, 5, 5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.can_run_triton(x, w)
    with pytest.raises(RuntimeError, match="triton: input is on cpu"):
        involution2d(x, w, 3, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match=r"triton: input dtype torch\.float64 is not supported"):
        involution2d(x.double(), w.double(), 3, backend="triton")
    monkeypatch.setattr(dispatch, "_TRITON_FOUND", False)
    with pytest.raises(RuntimeError, match="triton: not installed"):
        dispatch.can_run_triton(x, w, raise_error=True)


# RedNet-50's involution layers: (channels, size, kernel_size, stride), 16 channels per group.
REDNET_LAYERS = [(32, 112, 3, 1), (64, 56, 7, 1), (128, 56, 7, 2), (512, 7, 7, 1)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layer", REDNET_LAYERS, ids=str)
def test_rednet_shapes_on_cuda(layer, dtype, layout):
    channels, size, kernel_size, stride = layer
    case = (8, channels, channels // 16, (size, size), kernel_size, stride, 1, None)
    assert_matches_reference(2, dtype, "cuda", *case, layout=layout)


@pytest.mark.gpu
@needs_cuda
def test_odd_geometry_on_cuda():
    for layout in LAYOUTS:
        for case in CASES_2D[2:5]:
            assert_matches_reference(2, torch.float32, "cuda", *case, layout=layout)
        assert_matches_reference(
            1, torch.float16, "cuda", 2, 6, 2, (13,), 5, 2, 1, None, layout=layout
        )
        case_3d = (2, 32, 2, (9, 10, 11), 3, 2, 1, None)
        assert_matches_reference(3, torch.bfloat16, "cuda", *case_3d, layout=layout)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_graph_replays_forward_and_backward(layout):
    """Captured once the shapes have run eagerly, a step (forward and both gradients) replays
    with new inputs and gives what the eager op gives."""
    case = (4, 64, 4, (14, 14), 7, 1, 1, None)
    (x, w, g), kwargs = make_case(2, *case, dtype=torch.bfloat16, device="cuda", layout=layout)
    x, w = x.requires_grad_(), w.requires_grad_()

    def step():
        y = involution2d(x, w, backend="triton", **kwargs)
        gx, gw = torch.autograd.grad(y, (x, w), g)
        return y, gx, gw

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles and plans every launch outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
        w.copy_(torch.randn_like(w))
    graph.replay()
    torch.cuda.synchronize()
    for got, expected in zip(captured, step(), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
def test_compile_reduce_overhead_matches_eager():
    """``torch.compile(mode="reduce-overhead")`` records forward and backward in CUDA graphs
    (no step skips them); warm-up, recording and replays with new values give what the eager
    op gives, in the input's layout."""
    from torch._dynamo.utils import counters

    case = (4, 64, 4, (14, 14), 7, 1, 1, None)
    (x, w, g), kwargs = make_case(
        2, *case, dtype=torch.bfloat16, device="cuda", layout="channels_last"
    )

    def fn(x, w):
        return involution2d(x, w, backend="triton", **kwargs)

    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    counters.clear()
    for _ in range(4):  # warm-up, recording, two replays
        x.normal_()  # in place: the layouts stay
        w.normal_()
        results = []
        for f in (compiled, fn):
            xi, wi = x.detach().requires_grad_(), w.detach().requires_grad_()
            torch.compiler.cudagraph_mark_step_begin()
            y = f(xi, wi)
            y.backward(g)
            assert y.is_contiguous(memory_format=torch.channels_last)
            results.append((y.detach().clone(), xi.grad.clone(), wi.grad.clone()))
        rtol, atol = TOLERANCES[torch.bfloat16]
        for got, expected in zip(*results, strict=True):
            torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    assert counters["inductor"]["cudagraph_skips"] == 0


@pytest.mark.gpu
@needs_cuda
def test_auto_picks_triton_on_cuda():
    x = torch.randn(1, 16, 8, 8, device="cuda")
    w = torch.randn(1, 1, 9, 8, 8, device="cuda")
    assert dispatch.choose_backend(x, w, "auto") == "triton"

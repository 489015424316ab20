"""Shared test helpers: random inputs for the op and a tolerance table per dtype."""

from __future__ import annotations

import math

import pytest
import torch

from involution import functional
from involution.functional import output_size, resolve_geometry
from involution.ops import dispatch

_INVOLUTION = {
    1: functional.involution1d,
    2: functional.involution2d,
    3: functional.involution3d,
}

# For tests of the CPU kernels (ops/cpu/): skipped where they cannot be built (no compiler).
needs_cpu_kernels = pytest.mark.skipif(
    not dispatch.can_run_cpu(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1, 1)),
    reason="the CPU kernels could not be built on this machine (see the logged warning)",
)

# (rtol, atol) of a backend against the float64 reference, per dtype of the inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def make_inputs(
    n: int,
    batch: int,
    channels: int,
    groups: int,
    size: tuple[int, ...],
    kernel_size: int,
    stride: int = 1,
    dilation: int = 1,
    padding: int | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Random input and kernel for an ``n``-d involution, plus the geometry kwargs."""
    gen = torch.Generator().manual_seed(seed)
    geometry = resolve_geometry(n, kernel_size, stride, padding, dilation)
    out = output_size(size, *geometry)
    x = torch.randn(batch, channels, *size, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(batch, groups, math.prod(geometry[0]), *out, generator=gen, dtype=torch.float64)
    kwargs = {
        "kernel_size": kernel_size,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
    }
    return x, w.to(dtype), kwargs


def make_fused_inputs(case, dtype=torch.float64, bias=True, seed=0):
    """Random input, features, weight and bias of the fused op for ``case`` = (n, batch,
    channels, groups, hidden, size, kernel_size, stride, dilation), plus the geometry kwargs."""
    n, b, c, g, r, size, k, s, d = case
    gen = torch.Generator().manual_seed(seed)
    geometry = resolve_geometry(n, k, s, None, d)
    out = output_size(size, *geometry)
    taps = math.prod(geometry[0])

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    tensors = {
        "input": rand(b, c, *size),
        "features": rand(b, r, *out),
        "weight": rand(g * taps, r) / math.sqrt(r),
        "bias": rand(g * taps) if bias else None,
    }
    return tensors, {"kernel_size": k, "stride": s, "dilation": d}


def composed_reference(n, input, features, weight, bias, kwargs):
    """The definition, spelled out: a 1x1 convolution, then the reference involution."""
    taps = math.prod(resolve_geometry(n, **kwargs)[0])
    kernel = torch.einsum("kr,br...->bk...", weight, features)
    if bias is not None:
        kernel = kernel + bias.view(-1, *(1,) * n)
    kernel = kernel.reshape(input.shape[0], -1, taps, *features.shape[2:])
    return _INVOLUTION[n](input, kernel, backend="reference", **kwargs)


def assert_close_for(dtype: torch.dtype, actual: torch.Tensor, expected: torch.Tensor) -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """`make test` runs two workers on two cores: one thread each avoids oversubscription, which
    made the small models of these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Shared test helpers: random inputs for the op and a tolerance table per dtype."""

from __future__ import annotations

import math

import pytest
import torch

from involution.functional import output_size, resolve_geometry

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

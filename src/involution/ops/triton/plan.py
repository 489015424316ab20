"""Launch plans: a Triton launch worked out once per call signature, then replayed cheaply.

A plan holds everything a kernel launch needs but its tensors: the grid, the integer arguments
and the compile-time constants. Its first launch goes through Triton's launcher, which compiles
(or finds the compiled kernel in its cache); later launches call the compiled kernel directly,
with none of Triton's argument binding, specialization or cache lookup in Python. Planning and
launching allocate nothing and never wait for the device, so a planned op can be captured in a
CUDA graph once each of its call signatures has run eagerly.

:func:`signature` gives what a plan depends on beyond the caller's own constants: each tensor's
shape, strides and dtype, and its data pointer's 16-byte alignment, on which Triton specializes
a compiled kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class Plan:
    """One kernel launch without its tensors, which come first in the kernel's parameters.

    Args:
        kernel: the ``triton.jit`` function.
        grid: program counts along up to three axes.
        scalars: the arguments after the tensors, up to the compile-time constants.
        constexprs: every compile-time constant parameter, by name.
        num_warps: warps per program.
    """

    def __init__(
        self,
        kernel: Any,
        grid: Sequence[int],
        scalars: Sequence[Any],
        constexprs: dict[str, Any],
        num_warps: int,
    ) -> None:
        self.kernel = kernel
        # The compiled kernel's launcher reads three grid sizes (Triton's JIT pads the grid).
        self.grid = (*grid, 1, 1)[:3]
        self.scalars = tuple(scalars)
        self.constexprs = constexprs
        self.num_warps = num_warps
        self.compiled: Any = None
        self.arguments: tuple[Any, ...] = ()

    def launch(self, *tensors: torch.Tensor) -> None:
        if self.compiled is not None:
            self.compiled(*tensors, *self.arguments)
            return
        compiled = self.kernel[self.grid](
            *tensors, *self.scalars, **self.constexprs, num_warps=self.num_warps
        )
        # The interpreter returns nothing; it runs every call through the function.
        if compiled is not None:
            # The compiled launcher takes every parameter in order, constants included (it
            # skips them).
            names = self.kernel.arg_names[len(tensors) + len(self.scalars) :]
            self.arguments = (*self.scalars, *(self.constexprs[name] for name in names))
            self.compiled = compiled[self.grid]


def signature(tensors: Sequence[torch.Tensor | None]) -> tuple:
    """Shape, strides, dtype and 16-byte alignment of each tensor (None for a missing one), and
    the device of the first."""
    described = tuple(
        None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16) for t in tensors
    )
    return (*described, tensors[0].device)  # type: ignore[union-attr]

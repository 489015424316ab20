"""Backend choice for the involution op.

``backend="auto"`` walks ``AUTO_ORDER`` and takes the first backend whose ``can_run_<name>``
accepts the tensors. An explicit backend that cannot run raises a ``RuntimeError`` saying why.
The ``reference`` backend is never chosen automatically: it is the tests' oracle. ``triton`` is
chosen automatically for CUDA tensors only; named explicitly, it also runs CPU tensors under
Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests run its kernels without a
GPU. Triton is an optional dependency: it is imported only when the triton backend first runs.

``cpu`` (``ops/cpu/``) is chosen automatically for CPU tensors. Its kernels are compiled with the
system C++ compiler on first use (cached per machine); where that fails, ``can_run_cpu`` says
why, one warning is logged, and "auto" falls back to the portable ``torch`` backend.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from types import ModuleType

import torch

from . import portable
from .cpu import build as cpu_build

logger = logging.getLogger(__name__)

BACKENDS = ("reference", "torch", "triton", "cpu")
AUTO_ORDER = ("triton", "cpu", "torch")
# Devices on which "auto" may pick a backend; a backend not listed may run anywhere it accepts.
_AUTO_DEVICES = {"triton": ("cuda",), "cpu": ("cpu",)}
# Dtypes the Triton kernels load; they accumulate in float32.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Dtypes the CPU kernels take, and the names of their libraries; bfloat16 accumulates in float32.
CPU_DTYPES = {getattr(torch, name): name for name in cpu_build.DTYPES}


def _refuse(reason: str, raise_error: bool) -> bool:
    if raise_error:
        raise RuntimeError(reason)
    return False


def can_run_reference(input: torch.Tensor, kernel: torch.Tensor, raise_error: bool = False) -> bool:
    """The reference runs wherever PyTorch does."""
    return True


def can_run_torch(input: torch.Tensor, kernel: torch.Tensor, raise_error: bool = False) -> bool:
    """The portable backend runs on every device and floating dtype."""
    if not input.is_floating_point():
        return _refuse(
            f"torch: input dtype {input.dtype} is not a floating-point type", raise_error
        )
    return True


# Searched once: asked on every CUDA call, where the search would cost tens of microseconds and
# torch.compile (before torch 2.13) cannot trace it.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def can_run_triton(input: torch.Tensor, kernel: torch.Tensor, raise_error: bool = False) -> bool:
    """The Triton kernels run CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

    They take float32, float16 and bfloat16 (accumulating in float32) and index each
    (batch, group) row with 32-bit offsets.
    """
    device = input.device.type
    if not _TRITON_FOUND:
        return _refuse("triton: not installed (pip install 'involution[triton]')", raise_error)
    # The environment is read off CUDA only: torch.compile (before torch 2.13) cannot trace it.
    if device != "cuda" and not (device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        hint = " (set TRITON_INTERPRET=1 to run the kernels in the interpreter)"
        return _refuse(
            f"triton: input is on {device}{hint if device == 'cpu' else ''}", raise_error
        )
    if input.dtype not in TRITON_DTYPES:
        return _refuse(
            f"triton: input dtype {input.dtype} is not supported (expected one of "
            f"{', '.join(str(d) for d in TRITON_DTYPES)})",
            raise_error,
        )
    batch, channels = input.shape[:2]
    groups = kernel.shape[1]
    row = max(input[:1].numel(), kernel[:1].numel()) // max(groups, 1)
    if batch and channels and row >= 2**31:
        return _refuse(
            f"triton: one (batch, group) row holds {row} elements; the kernels index rows "
            "with 32-bit offsets (expected < 2**31)",
            raise_error,
        )
    return True


def can_run_cpu(input: torch.Tensor, kernel: torch.Tensor, raise_error: bool = False) -> bool:
    """The CPU kernels run CPU tensors of ``CPU_DTYPES`` once they are built.

    The first call for a dtype builds (or loads from the cache) that dtype's kernels; a build that
    fails makes this return False, with the compiler's reason.
    """
    if input.device.type != "cpu":
        return _refuse(f"cpu: input is on {input.device.type}", raise_error)
    if input.dtype not in CPU_DTYPES:
        return _refuse(
            f"cpu: input dtype {input.dtype} is not supported (expected one of "
            f"{', '.join(str(d) for d in CPU_DTYPES)})",
            raise_error,
        )
    try:
        cpu_build.library(CPU_DTYPES[input.dtype])
    except cpu_build.BuildError as error:
        return _refuse(f"cpu: could not be built: {error}", raise_error)
    return True


_CAN_RUN = {
    "reference": can_run_reference,
    "torch": can_run_torch,
    "triton": can_run_triton,
    "cpu": can_run_cpu,
}
_IMPLEMENTATIONS: dict[str, ModuleType] = {"torch": portable}
# Imported on first use: Triton is optional, and the CPU backend needs nothing until it runs.
_LAZY = {"triton": ".triton.launch", "cpu": ".cpu.launch"}
# Those of them with fused passes, for has_fused_passes() before the import: torch.compile
# (before torch 2.13) cannot trace an import. A test checks the list against the modules.
_LAZY_FUSED = ("triton", "cpu")


def _auto_candidate(name: str, input: torch.Tensor, kernel: torch.Tensor) -> bool:
    devices = _AUTO_DEVICES.get(name)
    if devices is not None and input.device.type not in devices:
        return False
    return _CAN_RUN[name](input, kernel)


def choose_backend(input: torch.Tensor, kernel: torch.Tensor, backend: str) -> str:
    """Resolves ``backend`` ("auto" or a name in ``BACKENDS``) to the backend that will run.

    Raises:
        ValueError: ``backend`` is not a known name.
        RuntimeError: the named backend cannot run these tensors; the message says why.
    """
    if backend == "auto":
        chosen = next(name for name in AUTO_ORDER if _auto_candidate(name, input, kernel))
    elif backend in _CAN_RUN:
        _CAN_RUN[backend](input, kernel, raise_error=True)
        chosen = backend
    else:
        raise ValueError(f"backend ({backend!r}) must be 'auto' or one of {BACKENDS}")
    if not torch.compiler.is_compiling():
        logger.debug("involution: backend %s on %s %s", chosen, input.device, input.dtype)
    return chosen


def has_fused_passes(backend: str) -> bool:
    """Whether ``backend`` computes the fused op natively (``fused_forward``/``fused_backward``).

    Without them the fused op composes the span with the backend's passes and recomputes the
    kernel in the backward: it saves memory, at the cost of a second span convolution.
    """
    module = _IMPLEMENTATIONS.get(backend)
    if module is None:  # not imported yet
        return backend in _LAZY_FUSED
    return backend != "reference" and hasattr(module, "fused_forward")


def implementation(backend: str) -> ModuleType:
    """The module holding ``forward``, ``grad_input`` and ``grad_kernel`` of a backend.

    The Triton and CPU backends are imported on first use, so that the package imports without
    Triton and ``TRITON_INTERPRET`` is read when the kernels are compiled, not when the package
    loads.
    """
    if backend not in _IMPLEMENTATIONS and backend in _LAZY:
        _IMPLEMENTATIONS[backend] = importlib.import_module(_LAZY[backend], __package__)
    return _IMPLEMENTATIONS[backend]

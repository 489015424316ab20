"""Backend choice for the involution op.

``backend="auto"`` walks ``AUTO_ORDER`` and takes the first backend whose ``can_run_<name>``
accepts the tensors. An explicit backend that cannot run raises a ``RuntimeError`` saying why.
The ``reference`` backend is never chosen automatically: it is the tests' oracle.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch

from . import portable

logger = logging.getLogger(__name__)

BACKENDS = ("reference", "torch")
AUTO_ORDER = ("torch",)


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


_CAN_RUN = {"reference": can_run_reference, "torch": can_run_torch}
_IMPLEMENTATIONS: dict[str, ModuleType] = {"torch": portable}


def choose_backend(input: torch.Tensor, kernel: torch.Tensor, backend: str) -> str:
    """Resolves ``backend`` ("auto" or a name in ``BACKENDS``) to the backend that will run.

    Raises:
        ValueError: ``backend`` is not a known name.
        RuntimeError: the named backend cannot run these tensors; the message says why.
    """
    if backend == "auto":
        chosen = next(name for name in AUTO_ORDER if _CAN_RUN[name](input, kernel))
    elif backend in _CAN_RUN:
        _CAN_RUN[backend](input, kernel, raise_error=True)
        chosen = backend
    else:
        raise ValueError(f"backend ({backend!r}) must be 'auto' or one of {BACKENDS}")
    if not torch.compiler.is_compiling():
        logger.debug("involution: backend %s on %s %s", chosen, input.device, input.dtype)
    return chosen


def implementation(backend: str) -> ModuleType:
    """The module holding ``forward``, ``grad_input`` and ``grad_kernel`` of a backend."""
    return _IMPLEMENTATIONS[backend]

"""Training checkpoints that lose nothing: atomic writes and exact resumption.

A checkpoint holds the model, optimizer, scheduler and grad-scaler states, the number of
finished epochs and optimizer steps, the random states of Python, NumPy and torch (CPU and
CUDA), the metrics so far and the run's configuration. It is written to a temporary file in the
same directory, flushed to disk, then renamed over the old one (``os.replace`` is atomic), so a
crash mid-write leaves the previous checkpoint intact. Loading uses ``weights_only=True``: a
checkpoint file cannot run code.
"""

from __future__ import annotations

import logging
import os
import random
import zipfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "capture_rng_state",
    "find_checkpoint",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
_FORMAT = "involution-train-checkpoint"
_VERSION = 1
_REQUIRED = (
    "model",
    "optimizer",
    "scheduler",
    "epoch",
    "step",
    "rng",
    "config",
    "num_classes",
    "in_chans",
    "history",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or is not a training checkpoint of this library."""


def capture_rng_state() -> dict[str, Any]:
    """The random states of Python, NumPy and torch, in a form ``weights_only`` loads."""
    np_state = cast(tuple, np.random.get_state(legacy=True))
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`capture_rng_state` captured."""
    random.setstate(_as_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    # random.setstate needs tuples; serialization may hand lists back.
    if isinstance(value, list | tuple):
        return tuple(_as_tuples(v) for v in value)
    return value


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes ``state`` to ``path`` atomically (temporary file, fsync, rename).

    Args:
        state: the entries of :data:`_REQUIRED` (see :func:`involution.training.fit`).
        path: destination; its directory is created when missing.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": _FORMAT, "version": _VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.debug("checkpoint written to %s", path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint written by :func:`save_checkpoint`; never modifies the file.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or not such a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated and cannot be loaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "it was left as it is"
        ) from err
    except Exception as err:  # unpickling of a foreign file raises arbitrary types
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a training checkpoint ({type(err).__name__})"
        ) from err
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not an involution training checkpoint "
            "(written by `involution train`)"
        )
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks the entries {missing}")
    return state


def find_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``--resume auto`` continues from: ``<output_dir>/last.pt``, if present."""
    path = Path(output_dir) / CHECKPOINT_NAME
    return path if path.exists() else None

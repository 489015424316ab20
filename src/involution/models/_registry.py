"""The table of model names: ``register_model`` fills it, ``list_models`` and the builder read it."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import TypeVar

from torch import nn

__all__ = ["get_model_entrypoint", "list_models", "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}

ModelFn = TypeVar("ModelFn", bound=Callable[..., nn.Module])


def register_model(fn: ModelFn) -> ModelFn:
    """Registers a model constructor under its function name.

    Raises:
        ValueError: the name is already registered.
    """
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model name {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models that match a shell-style ``pattern``.

    Example:
        >>> list_models("rednet*_cifar")[:2]
        ['rednet101_cifar', 'rednet152_cifar']
    """
    return sorted(name for name in _MODELS if fnmatch.fnmatchcase(name, pattern))


def get_model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The constructor registered as ``name``.

    Raises:
        ValueError: ``name`` is not registered; the message lists close matches.
    """
    if name not in _MODELS:
        close = difflib.get_close_matches(str(name), _MODELS, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"model name ({name!r}) is not a registered model{hint} (`involution list-models` "
            "or involution.list_models() lists them)"
        )
    return _MODELS[name]

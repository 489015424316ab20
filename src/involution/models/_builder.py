"""``create_model``: looks a name up in the registry, builds the model, loads weights strictly."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._registry import get_model_entrypoint
from .weights import PathLike, load_state_dict_strict, read_weights

__all__ = ["check_model_kwargs", "create_model"]

logger = logging.getLogger(__name__)

# Keys of the classification head, which a features_only model does not have.
HEAD_PREFIX = "fc."
# Arguments of create_model itself, which every model function takes.
_CREATE_ARGS = ("num_classes", "in_chans", "features_only", "out_indices")


def check_model_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """Checks that the model ``name`` exists and that its builder takes every key of ``kwargs``.

    Checks names only, without building anything (values are the builder's to check).

    Raises:
        ValueError: an unknown model name (close matches listed), or a keyword the builder does
            not take; the message lists the ones it takes.
    """
    entrypoint = get_model_entrypoint(name)
    parameters = inspect.signature(entrypoint).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # a builder taking **kwargs: only it can tell
    unknown = [key for key in kwargs if key not in parameters or key in _CREATE_ARGS]
    if unknown:
        accepted = [p for p in parameters if p not in _CREATE_ARGS]
        raise ValueError(
            f"model argument {unknown[0]!r} is not an argument of {name}; it takes "
            f"{', '.join(accepted) or 'none'}"
        )


def create_model(
    name: str,
    pretrained: PathLike | None = None,
    num_classes: int = 1000,
    in_chans: int = 3,
    features_only: bool = False,
    out_indices: Sequence[int] = (1, 2, 3, 4),
    **kwargs: Any,
) -> nn.Module:
    """Builds a registered model, optionally with weights from a ``.safetensors`` file.

    Args:
        name: a name from :func:`involution.list_models`, e.g. ``"rednet50"``.
        pretrained: path of a file written by :func:`involution.models.save_weights` or by
            ``involution convert``; its keys and shapes must match the model exactly (a
            ``features_only`` model ignores the file's classifier). Nothing is downloaded.
        num_classes: classes of the classifier.
        in_chans: input channels.
        features_only: build a backbone whose forward returns the feature maps at
            ``out_indices`` (see ``feature_info``) instead of logits.
        out_indices: feature maps of a ``features_only`` model: 0 the stem, 1 to 4 the stages.
        **kwargs: builder arguments, e.g. ``base_width``, ``drop_rate``, ``stem_kernel_size``,
            ``backend``, ``frozen_stages``, ``norm_eval``.

    Returns:
        The model, in train mode, with ``model_config`` holding the arguments that rebuild it.

    Raises:
        ValueError: unknown name (close matches listed), a bad argument, or weights that do not
            fit the model (wrong num_classes or in_chans, missing, unexpected or mismatched keys);
            no partial load ever happens.
        FileNotFoundError: ``pretrained`` does not exist.

    Example:
        >>> model = create_model("rednet26_cifar", num_classes=10, base_width=16)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    check_model_kwargs(name, kwargs)
    entrypoint = get_model_entrypoint(name)
    for arg, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{arg} ({value!r}) must be a positive int")
    if pretrained is not None and not isinstance(pretrained, str | os.PathLike):
        raise ValueError(
            f"pretrained ({pretrained!r}) must be None or the path of a .safetensors file "
            "(weights are never downloaded)"
        )
    model = entrypoint(
        num_classes=num_classes,
        in_chans=in_chans,
        features_only=features_only,
        out_indices=out_indices,
        **kwargs,
    )
    # nn.Module's __setattr__ is typed for tensors and modules only.
    model.model_config = {  # type: ignore[assignment]
        "name": name,
        "num_classes": num_classes,
        "in_chans": in_chans,
        "features_only": features_only,
        "out_indices": list(out_indices),
        "kwargs": dict(kwargs),
    }
    if pretrained is not None:
        state_dict, config = read_weights(pretrained)
        load_pretrained(model, state_dict, config, repr(os.fspath(pretrained)))
    return model


def load_pretrained(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | None,
    source: str,
) -> None:
    """Loads weights read from a file into a model built by :func:`create_model`, strictly.

    Args:
        model: the model; its ``model_config`` says what it is.
        state_dict, config: the file's tensors and model config (``read_weights``).
        source: the file, for messages.

    Raises:
        ValueError: the weights do not fit the model; nothing is loaded.
    """
    built: dict[str, Any] = model.model_config  # type: ignore[assignment]
    name, num_classes = built["name"], built["num_classes"]
    in_chans, features_only = built["in_chans"], built["features_only"]
    if config is not None and config["name"] != name:
        logger.warning("loading weights saved for %s into %s", config["name"], name)
    if features_only:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIX)}
    elif "fc.weight" in state_dict and state_dict["fc.weight"].shape[0] != num_classes:
        classes = state_dict["fc.weight"].shape[0]
        raise ValueError(
            f"num_classes ({num_classes}) does not match the {classes} classes of weight file "
            f"{source}; build with num_classes={classes}, then call "
            f"model.reset_classifier({num_classes}) to fine-tune (`involution train "
            "--reset-classifier` does this); nothing loaded"
        )
    stem = state_dict.get("stem.conv1.weight")
    if stem is not None and stem.dim() == 4 and stem.shape[1] != in_chans:
        raise ValueError(
            f"in_chans ({in_chans}) does not match the {stem.shape[1]} input channels of weight "
            f"file {source}; nothing loaded"
        )
    load_state_dict_strict(model, state_dict, source)
    logger.info("loaded %s weights from %s", name, source)

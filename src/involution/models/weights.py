"""Model weights on disk: one ``.safetensors`` file holding the tensors and the model config.

The config is the JSON of the arguments that rebuild the model with
:func:`involution.create_model` (``name``, ``num_classes``, ``in_chans``, ``features_only``,
``out_indices`` and the builder ``kwargs``), plus the arguments of each
:func:`~involution.models.involutionize` call made on it since (``involutionize``), stored in
the file's metadata under the key ``"involution.config"``, so one file is all
:func:`load_weights` needs. Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CONFIG_KEY", "load_state_dict_strict", "load_weights", "read_weights", "save_weights"]

logger = logging.getLogger(__name__)

CONFIG_KEY = "involution.config"

PathLike = str | os.PathLike[str]


def save_weights(model: nn.Module, path: PathLike) -> None:
    """Writes the model's state_dict and config to a ``.safetensors`` file.

    The file is written atomically (a temporary file renamed over ``path``), with the
    permissions of any new file (those the umask leaves); missing parent folders are created.

    Args:
        model: a model made by :func:`involution.create_model` (it carries ``model_config``),
            possibly changed by ``involutionize`` or ``reset_classifier`` since.
        path: file to write.

    Raises:
        ValueError: the model has no ``model_config``, or its kwargs are not JSON values.
    """
    config = getattr(model, "model_config", None)
    if not isinstance(config, dict):
        raise ValueError(
            f"model ({type(model).__name__}) has no model_config: build it with "
            "involution.create_model() so that load_weights() can rebuild it"
        )
    if not config.get("features_only"):
        # reset_classifier() may have changed the head since the model was built.
        config = {**config, "num_classes": getattr(model, "num_classes", config["num_classes"])}
    try:
        metadata = json.dumps(config, sort_keys=True)
    except TypeError as err:
        raise ValueError(
            f"model_config ({config!r}) must hold only JSON values to be saved: {err}"
        ) from err
    from safetensors.torch import save

    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    # Serialized here and written with open(), because safetensors' own writer creates its
    # file with mode 0600 whatever the umask, unlike every other output of a run.
    data = save(tensors, metadata={"format": "pt", CONFIG_KEY: metadata})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("saved %d tensors of %s to %s", len(tensors), config["name"], path)


def read_weights(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Reads a ``.safetensors`` file: its tensors and its model config (``None`` if absent).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable safetensors file (corrupted or truncated), or its
            config is not valid JSON.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file ({path!r}) does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"weight file ({path!r}) is not a valid safetensors file (corrupted or truncated?): "
            f"{err}"
        ) from err
    config = None
    if CONFIG_KEY in metadata:
        try:
            config = json.loads(metadata[CONFIG_KEY])
        except json.JSONDecodeError as err:
            raise ValueError(
                f"weight file ({path!r}) has a corrupted {CONFIG_KEY!r} metadata entry: {err}"
            ) from err
        if not isinstance(config, dict) or "name" not in config:
            raise ValueError(
                f"weight file ({path!r}) has a {CONFIG_KEY!r} entry without a model name: "
                f"{config!r}"
            )
    return tensors, config


def load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    """Loads ``state_dict`` only if its keys and shapes are exactly the model's.

    Args:
        model: the model to load into; left untouched when anything does not match.
        state_dict: tensors to load.
        source: where the tensors come from, for the error message.

    Raises:
        ValueError: lists the missing, unexpected and shape-mismatched keys.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    )
    if missing or unexpected or mismatched:
        lines = [f"state_dict from {source} does not match {type(model).__name__}; nothing loaded."]
        for title, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if keys:
                shown = "\n    ".join(keys[:20])
                more = f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else ""
                lines.append(f"  {title} ({len(keys)}):\n    {shown}{more}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


def load_weights(path: PathLike) -> nn.Module:
    """Rebuilds the model saved by :func:`save_weights` and loads its weights strictly.

    The model is built by :func:`involution.create_model` from the file's config, then
    ``involutionize`` is replayed with the recorded arguments, if it was called.

    Raises:
        FileNotFoundError, ValueError: as :func:`read_weights`; ValueError too when the file has
            no model config (then use ``create_model(name, pretrained=path)``) or does not fit it.

    Example:
        >>> save_weights(create_model("rednet26_cifar", num_classes=10, base_width=16), "m.safetensors")
        >>> model = load_weights("m.safetensors")
    """
    # Imported here because the builder loads weights with this module's functions.
    from ._builder import create_model, load_pretrained
    from .involutionize import involutionize

    state_dict, config = read_weights(path)
    if config is None:
        raise ValueError(
            f"weight file ({os.fspath(path)!r}) has no {CONFIG_KEY!r} metadata; load it with "
            "create_model(name, pretrained=path) instead"
        )
    kwargs = dict(config.get("kwargs", {}))
    model = create_model(
        config["name"],
        num_classes=config.get("num_classes", 1000),
        in_chans=config.get("in_chans", 3),
        features_only=config.get("features_only", False),
        out_indices=tuple(config.get("out_indices", (1, 2, 3, 4))),
        **kwargs,
    )
    for arguments in config.get("involutionize", []):
        involutionize(model, **arguments)
    load_pretrained(model, state_dict, config, repr(os.fspath(path)))
    return model

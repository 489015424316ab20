"""The authors' RedNet checkpoints (d-li14/involution, mmcls) to this library's models, and back.

An official checkpoint is ``{"meta": ..., "state_dict": ...}`` with keys ``backbone.<key>`` and
``head.fc.{weight,bias}``. Our RedNet has the same stages and blocks; the differences are
the stem's module names and the involution's submodule names, which
:func:`involution.nn.convert_official_state_dict` translates:

=============================  ==============================
authors (inside ``backbone.``)  ours
=============================  ==============================
``stem.0.conv`` / ``stem.0.bn``  ``stem.conv1`` / ``stem.bn1``
``stem.1`` (involution)          ``stem.conv2``
``stem.2`` (BN)                  ``stem.bn2``
``stem.4.conv`` / ``stem.4.bn``  ``stem.conv3`` / ``stem.bn3``
``layerI.J.conv2`` (involution)  ``layerI.J.conv2`` (reduce, norm, span)
``head.fc`` (outside backbone)   ``fc``
=============================  ==============================
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..nn import OFFICIAL_KEY_PREFIXES, convert_official_state_dict
from ._builder import create_model
from .rednet import DEPTHS, GROUP_CHANNELS, RedNet, ResNet
from .weights import PathLike, load_state_dict_strict

__all__ = ["from_official", "load_official_checkpoint", "to_official"]

logger = logging.getLogger(__name__)

_BACKBONE = "backbone."
_HEAD = ("head.fc.", "fc.")
# Authors' stem module prefix -> ours; the involution at stem.1 is renamed separately.
_STEM = {
    "stem.0.conv.": "stem.conv1.",
    "stem.0.bn.": "stem.bn1.",
    "stem.2.": "stem.bn2.",
    "stem.4.conv.": "stem.conv3.",
    "stem.4.bn.": "stem.bn3.",
}
# Involution modules: the authors' prefix (group 1) and the rest of the key (group 2).
_OFFICIAL_INVOLUTION = re.compile(r"^(stem\.1\.|layer\d+\.\d+\.conv2\.)(.+)$")
_OUR_INVOLUTION = re.compile(r"^(stem\.conv2\.|layer\d+\.\d+\.conv2\.)(.+)$")


def _replace_prefix(key: str, table: Mapping[str, str]) -> str | None:
    prefix = next((p for p in table if key.startswith(p)), None)
    return None if prefix is None else table[prefix] + key[len(prefix) :]


def _raise_unexpected(keys: list[str], what: str) -> None:
    shown = "\n    ".join(sorted(keys)[:20])
    more = f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else ""
    raise ValueError(
        f"{len(keys)} key(s) are not keys of {what}; nothing converted:\n    {shown}{more}"
    )


def from_official(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Renames an official RedNet state_dict (or whole checkpoint) to this library's keys.

    Args:
        state_dict: ``checkpoint["state_dict"]``, or the checkpoint itself.

    Returns:
        A new dict with our keys and the same tensors.

    Raises:
        ValueError: keys outside ``backbone.*`` and ``head.fc.*``, or involution keys that the
            authors' module does not have; all of them are listed.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    renamed: dict[str, torch.Tensor] = {}
    involutions: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, value in state_dict.items():
        if key.startswith(_HEAD[0]):
            renamed[_HEAD[1] + key[len(_HEAD[0]) :]] = value
            continue
        if not key.startswith(_BACKBONE):
            unexpected.append(key)
            continue
        inner = key[len(_BACKBONE) :]
        match = _OFFICIAL_INVOLUTION.match(inner)
        if match:
            involutions.setdefault(match[1], {})[match[2]] = value
            continue
        renamed[_replace_prefix(inner, _STEM) or inner] = value
    for prefix, sub in involutions.items():
        ours = "stem.conv2." if prefix == "stem.1." else prefix
        try:
            renamed.update({ours + k: v for k, v in convert_official_state_dict(sub).items()})
        except KeyError:
            unexpected += [
                _BACKBONE + prefix + k
                for k in sub
                if _replace_prefix(k, OFFICIAL_KEY_PREFIXES) is None
            ]
    if unexpected:
        _raise_unexpected(unexpected, "an official RedNet checkpoint (backbone.* and head.fc.*)")
    return renamed


def to_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`from_official`: our keys to the authors' ``state_dict`` keys.

    Raises:
        ValueError: keys that no RedNet of this library has (e.g. a ResNet baseline's).
    """
    our_prefixes = {v: k for k, v in OFFICIAL_KEY_PREFIXES.items()}
    stem = {v: k for k, v in _STEM.items()}
    renamed: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state_dict.items():
        if key.startswith(_HEAD[1]):
            renamed[_HEAD[0] + key[len(_HEAD[1]) :]] = value
            continue
        match = _OUR_INVOLUTION.match(key)
        if match:
            inner = _replace_prefix(match[2], our_prefixes)
            if inner is None:
                unexpected.append(key)
                continue
            prefix = "stem.1." if match[1] == "stem.conv2." else match[1]
            renamed[_BACKBONE + prefix + inner] = value
            continue
        renamed[_BACKBONE + (_replace_prefix(key, stem) or key)] = value
    if unexpected:
        _raise_unexpected(unexpected, "a RedNet of this library")
    return renamed


def _infer_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Depth, stem kernel, widths and head size of a RedNet from its (our-keys) state_dict."""
    blocks = []
    for stage in range(1, 5):
        pattern = re.compile(rf"^layer{stage}\.(\d+)\.")
        indices = {int(m[1]) for k in state_dict if (m := pattern.match(k))}
        blocks.append(len(indices))
    depth = next((d for d, layers in DEPTHS.items() if tuple(blocks) == layers), None)
    if depth is None:
        raise ValueError(
            f"blocks per stage {tuple(blocks)} match no RedNet depth "
            f"({', '.join(f'{d}: {v}' for d, v in DEPTHS.items())})"
        )
    config: dict[str, Any] = {"name": f"rednet{depth}", "kwargs": {}}
    stem_conv = state_dict.get("stem.conv1.weight")
    span = state_dict.get("stem.conv2.span.weight")
    width = state_dict.get("stem.conv3.weight")
    if stem_conv is None or span is None or width is None:
        raise ValueError(
            "state_dict has no complete stem (stem.conv1, stem.conv2.span, stem.conv3)"
        )
    config["in_chans"] = stem_conv.shape[1]
    base_width = width.shape[0]
    if base_width != 64:
        config["kwargs"]["base_width"] = base_width
    stem_channels = base_width // 2
    groups = stem_channels // min(GROUP_CHANNELS, stem_channels)
    kernel_size = math.isqrt(span.shape[0] // groups)
    if kernel_size != 3:
        config["kwargs"]["stem_kernel_size"] = kernel_size
    if "fc.weight" in state_dict:
        config["num_classes"] = state_dict["fc.weight"].shape[0]
    else:
        config["features_only"] = True
    return config


def load_official_checkpoint(
    checkpoint: PathLike | Mapping[str, Any], name: str | None = None
) -> RedNet:
    """Builds our RedNet from the authors' checkpoint, checking every key and shape.

    Args:
        checkpoint: path of an official ``.pth`` file (read with ``torch.load(weights_only=True)``)
            or the loaded checkpoint / state_dict.
        name: model to build, e.g. ``"rednet50"``; by default inferred from the checkpoint
            (depth, stem kernel, number of classes). A checkpoint without ``head.fc``, such as
            a detection backbone, gives a ``features_only`` model.

    Returns:
        The model in eval mode, its ``model_config`` ready for :func:`save_weights`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable checkpoint, or its keys or shapes do not match
            the model (missing, unexpected and mismatched keys are listed); nothing is loaded.

    Example:
        >>> model = load_official_checkpoint("rednet50-1c7a7d5d.pth")
        >>> save_weights(model, "rednet50.safetensors")
    """
    source = "the given checkpoint"
    if isinstance(checkpoint, str | os.PathLike):
        path = os.fspath(checkpoint)
        source = repr(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint ({path!r}) does not exist")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"checkpoint ({path!r}) cannot be read with torch.load(weights_only=True) "
                f"(corrupted, truncated, or not a PyTorch checkpoint?): {err}"
            ) from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint {source} must be a dict, got {type(checkpoint).__name__}")
    state_dict = from_official(checkpoint)
    config = _infer_config(state_dict)
    model = create_model(
        name or config["name"],
        num_classes=config.get("num_classes", 1000),
        in_chans=config["in_chans"],
        features_only=config.get("features_only", False),
        **config["kwargs"],
    )
    if not isinstance(model, RedNet) or isinstance(model, ResNet):
        raise ValueError(f"name ({name!r}) must name a RedNet, got a {type(model).__name__}")
    load_state_dict_strict(model, state_dict, source)
    logger.info("converted %s from the authors' checkpoint %s", model.model_config["name"], source)
    return model.eval()

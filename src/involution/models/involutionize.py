"""Turn a CNN into its involution counterpart, as RedNet is made from ResNet (Li et al., Sec. 4).

:func:`involutionize` replaces every spatial convolution (kernel > 1, ``groups == 1``, "same"
padding) by an involution with the same stride and dilation, followed by a 1x1 projection where
the output channels differ; every other convolution is left alone and reported with the reason.
On a model of :func:`involution.create_model` it also records its arguments in the model's
``model_config``, so that ``save_weights`` / ``load_weights`` round-trip the new structure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..nn import Involution1d, Involution2d, Involution3d

__all__ = ["InvolutionizeReport", "involutionize"]

logger = logging.getLogger(__name__)

_REPLACEMENT = {nn.Conv1d: Involution1d, nn.Conv2d: Involution2d, nn.Conv3d: Involution3d}


@dataclass
class InvolutionizeReport:
    """What :func:`involutionize` did.

    Attributes:
        replaced: qualified names of the convolutions now involutions.
        skipped: qualified name -> why that convolution was kept.
    """

    replaced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} convolution(s):"]
        lines += [f"  {name}" for name in self.replaced]
        lines.append(f"kept {len(self.skipped)} convolution(s):")
        lines += [f"  {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def _why_not(
    conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, group_channels: int, reduction_ratio: int
) -> str | None:
    """The reason this convolution cannot become an involution, or ``None`` if it can."""
    if all(k == 1 for k in conv.kernel_size):
        return "pointwise (kernel_size 1): it mixes no space"
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r} (involution pads with zeros)"
    same = tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation, strict=True))
    if any(k % 2 == 0 for k in conv.kernel_size) or conv.padding not in ("same", same):
        return (
            f"padding {conv.padding} with kernel_size {conv.kernel_size} is not 'same': "
            "the output size would change"
        )
    if conv.in_channels % group_channels != 0:
        return f"in_channels ({conv.in_channels}) is not divisible by group_channels ({group_channels})"
    if conv.in_channels // reduction_ratio == 0:
        return (
            f"in_channels ({conv.in_channels}) is smaller than reduction_ratio ({reduction_ratio})"
        )
    return None


def involutionize(
    model: nn.Module, kernel_size: int = 7, **involution_kwargs: Any
) -> InvolutionizeReport:
    """Replaces, in place, the spatial convolutions of ``model`` by involutions.

    A convolution ``Conv(C_in, C_out, k, stride, dilation)`` with k > 1, ``groups == 1`` and
    "same" zero padding becomes ``Involution(C_in, kernel_size, stride, dilation)``, plus a 1x1
    projection to ``C_out`` when ``C_out != C_in``. The new layers are freshly initialized (train
    or fine-tune afterwards) and the convolution's bias is dropped (the projection has one).

    Args:
        model: any module; changed in place.
        kernel_size: K of every involution (7 in RedNet).
        **involution_kwargs: passed to each involution, e.g. ``group_channels``,
            ``reduction_ratio``, ``backend``.

    Returns:
        The names of the replaced convolutions and, for each one kept, why.

    A model built by :func:`involution.create_model` gets ``kernel_size`` and
    ``involution_kwargs`` appended to ``model.model_config["involutionize"]``: ``load_weights``
    replays the call, which replaces the same convolutions. ``save_weights`` then needs those
    arguments to be JSON values (e.g. no ``norm_layer`` function).

    Example:
        >>> report = involutionize(create_model("resnet26"))
        >>> print(report)
    """
    group_channels = involution_kwargs.get("group_channels", 16)
    reduction_ratio = involution_kwargs.get("reduction_ratio", 4)
    report = InvolutionizeReport()
    inside_involution = {
        name for name, m in model.named_modules() if isinstance(m, tuple(_REPLACEMENT.values()))
    }
    for name, conv in list(model.named_modules()):
        if not isinstance(conv, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            continue
        if type(conv) not in _REPLACEMENT:
            report.skipped[name] = (
                f"{type(conv).__name__} subclasses a convolution; its forward may differ"
            )
            continue
        if not name:
            report.skipped[name] = "the model itself is a convolution: replace it directly"
            continue
        if any(name.startswith(prefix + ".") for prefix in inside_involution):
            report.skipped[name] = "part of an involution's kernel generator"
            continue
        reason = _why_not(conv, group_channels, reduction_ratio)
        if reason is not None:
            report.skipped[name] = reason
            continue
        involution = _REPLACEMENT[type(conv)](
            conv.in_channels,
            kernel_size,
            stride=conv.stride,
            dilation=conv.dilation,
            out_channels=conv.out_channels,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **involution_kwargs,
        )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, involution)
        report.replaced.append(name)
    if not report.replaced:
        logger.warning("involutionize: no convolution replaced; see the report's reasons")
    config = getattr(model, "model_config", None)
    if isinstance(config, dict):
        calls = [
            *config.get("involutionize", []),
            {"kernel_size": kernel_size, **involution_kwargs},
        ]
        model.model_config = {**config, "involutionize": calls}  # type: ignore[assignment]
    return report

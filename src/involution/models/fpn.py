"""Feature pyramid network (Lin et al., CVPR 2017) whose 3x3 output convolutions are involutions.

In the paper's detection and segmentation experiments (Li et al., CVPR 2021, Sec. 5.2 and 5.3)
the involution neck replaces each FPN output convolution by an involution; the lateral 1x1
convolutions and the top-down pathway are those of a plain FPN. The neck takes any list of
feature maps, finest first, e.g. the output of a ``features_only`` model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import Involution2d
from .rednet import GROUP_CHANNELS

__all__ = ["FPN"]


class FPN(nn.Module):
    """Feature pyramid with involution (or, for comparison, 3x3 convolution) output layers.

    Args:
        in_channels: channels of each input feature map, finest first (e.g.
            ``[i["num_chs"] for i in backbone.feature_info]``).
        out_channels: channels of every output map; a multiple of ``group_channels`` (16).
        num_outs: maps returned; beyond ``len(in_channels)`` each extra level is the previous
            one subsampled by 2 (stride-2 max pooling, as in Faster R-CNN's FPN).
        involution: involution output layers (the paper's neck) or 3x3 convolutions.
        kernel_size: K of the output involutions.
        backend: involution backend.

    Example:
        >>> backbone = create_model("rednet50", features_only=True)
        >>> neck = FPN([i["num_chs"] for i in backbone.feature_info], num_outs=5)
        >>> [p.shape[-1] for p in neck(backbone(torch.randn(1, 3, 224, 224)))]
        [56, 28, 14, 7, 4]
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        num_outs: int | None = None,
        involution: bool = True,
        kernel_size: int = 7,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        in_channels = list(in_channels)
        if not isinstance(out_channels, int) or isinstance(out_channels, bool) or out_channels < 1:
            raise ValueError(f"out_channels ({out_channels!r}) must be a positive int")
        if involution and out_channels % GROUP_CHANNELS:
            raise ValueError(
                f"out_channels ({out_channels}) must be a multiple of {GROUP_CHANNELS}, the "
                "channels of an involution group (or use involution=False)"
            )
        if not in_channels or any(not isinstance(c, int) or c < 1 for c in in_channels):
            raise ValueError(
                f"in_channels ({in_channels!r}) must be a non-empty list of positive ints"
            )
        num_outs = len(in_channels) if num_outs is None else num_outs
        if num_outs < len(in_channels):
            raise ValueError(
                f"num_outs ({num_outs}) must be >= len(in_channels) ({len(in_channels)})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(
            Involution2d(out_channels, kernel_size, backend=backend)
            if involution
            else nn.Conv2d(out_channels, out_channels, 3, padding=1)
            for _ in in_channels
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Maps finest first, each with ``out_channels`` channels."""
        if len(features) != len(self.in_channels):
            raise ValueError(
                f"features has {len(features)} maps, expected {len(self.in_channels)} "
                f"(in_channels {self.in_channels})"
            )
        for i, (feature, channels) in enumerate(zip(features, self.in_channels, strict=True)):
            if feature.dim() != 4 or feature.shape[1] != channels:
                raise ValueError(
                    f"features[{i}] has shape {tuple(feature.shape)}, expected (B, {channels}, H, W)"
                )
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            coarse = F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
            laterals[i - 1] = laterals[i - 1] + coarse
        outs = [conv(x) for conv, x in zip(self.output_convs, laterals, strict=True)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs

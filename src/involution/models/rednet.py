"""RedNet (Li et al., CVPR 2021, Sec. 4 and Table 1) and ResNet baselines with the same skeleton.

RedNet is a ResNet with bottleneck blocks (expansion 4) in which the 3x3 convolution of every
block is a 7x7 involution carrying the block's stride, and whose stem is
``conv3x3(s2) -> BN -> ReLU -> involution3x3 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> maxpool``.
The ``resnet*`` models here are the same network with a 3x3 convolution wherever RedNet has an
involution, so that the two can be compared side by side; they are not torchvision's ResNets.

The ``*_cifar`` variants start with a stride-1 stem and no max-pool, for 32 x 32 images.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..nn import Involution2d
from ._registry import register_model

__all__ = ["Bottleneck", "RedNet", "ResNet", "Stem"]

logger = logging.getLogger(__name__)

# Blocks per stage of each depth (Li et al., Table 1; He et al. for 101 and 152).
DEPTHS = {
    26: (1, 2, 4, 1),
    38: (2, 3, 5, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
EXPANSION = 4
# Channels that share one involution kernel in the authors' models.
GROUP_CHANNELS = 16


def spatial_layer(
    kind: str, channels: int, kernel_size: int, stride: int, backend: str = "auto"
) -> nn.Module:
    """The layer that mixes space in a RedNet block or stem: an involution or a convolution.

    Args:
        kind: "involution" (RedNet) or "conv" (the ResNet baseline).
        channels: input and output channels.
        kernel_size: K of the involution; the baseline convolution is always 3 x 3, as in ResNet,
            except in the stem, where it takes the stem's kernel size.
        stride: spatial stride.
        backend: involution backend.
    """
    if kind == "involution":
        return Involution2d(
            channels,
            kernel_size,
            stride=stride,
            group_channels=min(GROUP_CHANNELS, channels),
            backend=backend,
        )
    return nn.Conv2d(channels, channels, kernel_size, stride, kernel_size // 2, bias=False)


class Stem(nn.Module):
    """``conv3x3 -> BN -> ReLU -> spatial layer -> BN -> ReLU -> conv3x3 -> BN -> ReLU``.

    Args:
        in_chans: input channels.
        width: output channels; the first two layers have ``width // 2``.
        kind: "involution" or "conv" (see :func:`spatial_layer`).
        kernel_size: kernel of the middle layer: 3 for classification, 7 in the authors'
            detection and segmentation backbones.
        stride: stride of the first convolution (2 on ImageNet, 1 for the cifar variants).
        backend: involution backend.
    """

    def __init__(
        self,
        in_chans: int,
        width: int,
        kind: str,
        kernel_size: int = 3,
        stride: int = 2,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        mid = width // 2
        self.conv1 = nn.Conv2d(in_chans, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = spatial_layer(kind, mid, kernel_size, 1, backend)
        self.bn2 = nn.BatchNorm2d(mid)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(mid, width, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.act3(self.bn3(self.conv3(x)))


class Bottleneck(nn.Module):
    """``1x1 -> spatial layer (strided) -> 1x1`` with a residual connection.

    Args:
        in_channels: input channels.
        width: channels of the spatial layer; the block outputs ``4 * width``.
        stride: stride of the spatial layer and of the shortcut.
        kind: "involution" (7 x 7 involution) or "conv" (3 x 3 convolution).
        kernel_size: K of the involution.
        backend: involution backend.
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        stride: int,
        kind: str,
        kernel_size: int = 7,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = spatial_layer(
            kind, width, kernel_size if kind == "involution" else 3, stride, backend
        )
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act(x + shortcut)


class RedNet(nn.Module):
    """RedNet, or its convolution twin, with timm-style methods.

    Args:
        layers: blocks in each of the four stages.
        num_classes: classes of the linear head.
        in_chans: input channels.
        kind: "involution" (RedNet) or "conv" (the ResNet baseline).
        base_width: width of stage 1's bottleneck (64 in the paper); stages double it and the stem
            outputs it. A multiple of 16, the involution group width.
        stem_kernel_size: kernel of the stem's middle layer (3 classification, 7 detection).
        stem_stride: 2 for ImageNet-sized inputs; 1 (with no max-pool) for 32 x 32 inputs.
        kernel_size: K of the bottleneck involutions.
        drop_rate: dropout before the classifier.
        zero_init_last: zero the last BN scale of each block, so that blocks start as identities.
        features_only: no head; ``forward`` returns the feature maps at ``out_indices``.
        out_indices: feature maps returned by a ``features_only`` model: 0 is the stem, 1 to 4
            the stages (strides 4, 8, 16, 32 on ImageNet-sized inputs).
        frozen_stages: as in detection recipes: -1 freezes nothing, 0 the stem, ``i`` the stem
            and stages 1 to ``i`` (no gradients, normalization kept in eval mode).
        norm_eval: keep every BatchNorm in eval mode during training (detection recipes).
        backend: involution backend.
    """

    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential
    fc: nn.Linear | None
    # Set by create_model: the arguments that rebuild this model (see weights.py).
    model_config: dict[str, Any]
    # Height and width of the images it is built for: 224, or 32 with a stride-1 stem. Tools
    # such as ``involution export`` take it as their default input size.
    image_size: int

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        kind: str = "involution",
        base_width: int = 64,
        stem_kernel_size: int = 3,
        stem_stride: int = 2,
        kernel_size: int = 7,
        drop_rate: float = 0.0,
        zero_init_last: bool = True,
        features_only: bool = False,
        out_indices: Sequence[int] = (1, 2, 3, 4),
        frozen_stages: int = -1,
        norm_eval: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("in_chans", in_chans)
        if kind not in ("involution", "conv"):
            raise ValueError(f"kind ({kind!r}) must be 'involution' or 'conv'")
        if not isinstance(base_width, int) or base_width < 16 or base_width % 16 != 0:
            raise ValueError(
                f"base_width ({base_width!r}) must be a positive multiple of 16, "
                "the involution group width"
            )
        if (
            not isinstance(stem_kernel_size, int)
            or stem_kernel_size < 1
            or stem_kernel_size % 2 == 0
        ):
            raise ValueError(f"stem_kernel_size ({stem_kernel_size!r}) must be a positive odd int")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride ({stem_stride!r}) must be 1 or 2")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate ({drop_rate!r}) must be in [0, 1)")
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages ({frozen_stages!r}) must be an int in [-1, 4]")
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in range(5) for i in out_indices):
            raise ValueError(f"out_indices ({out_indices!r}) must be a non-empty subset of 0..4")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.features_only = features_only
        self.out_indices = out_indices
        self.grad_checkpointing = False
        self.image_size = 224 if stem_stride == 2 else 32

        self.stem = Stem(in_chans, base_width, kind, stem_kernel_size, stem_stride, backend)
        # The cifar variants keep full resolution: no max-pool after a stride-1 stem.
        pool_stride = 2 if stem_stride == 2 else 1
        self.maxpool = nn.MaxPool2d(3, 2, 1) if pool_stride == 2 else nn.Identity()
        reduction = stem_stride
        info = [{"num_chs": base_width, "reduction": reduction, "module": "stem"}]
        in_channels = base_width
        for i, blocks in enumerate(layers):
            width = base_width * 2**i
            stride = 1 if i == 0 else 2
            stage = nn.Sequential(
                *(
                    Bottleneck(
                        in_channels if b == 0 else width * EXPANSION,
                        width,
                        stride if b == 0 else 1,
                        kind,
                        kernel_size,
                        backend,
                    )
                    for b in range(blocks)
                )
            )
            self.add_module(f"layer{i + 1}", stage)
            in_channels = width * EXPANSION
            reduction *= pool_stride if i == 0 else stride
            info.append({"num_chs": in_channels, "reduction": reduction, "module": f"layer{i + 1}"})
        self.num_features = in_channels
        self.stage_info = info
        if features_only:
            self.feature_info = [info[i] for i in out_indices]
            self.global_pool = self.head_drop = self.fc = None
        else:
            self.feature_info = info
            self.global_pool = nn.AdaptiveAvgPool2d(1)
            self.head_drop = nn.Dropout(drop_rate)
            self.fc = nn.Linear(in_channels, num_classes)
        self.init_weights(zero_init_last)
        self._freeze_stages()

    def init_weights(self, zero_init_last: bool = True) -> None:
        """Kaiming-normal convolutions (fan-out), unit BN, and optionally zero last BN per block."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_last:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)

    def stages(self) -> list[nn.Module]:
        """The stem and the four stages, in order: index ``i`` is feature ``i``."""
        return [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def _freeze_stages(self) -> None:
        for module in self.stages()[: self.frozen_stages + 1]:
            module.eval()
            for param in module.parameters():
                param.requires_grad_(False)

    def train(self, mode: bool = True) -> RedNet:
        """Sets train mode, keeping frozen stages (and with ``norm_eval`` every BN) in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recomputes each block's activations in the backward pass instead of storing them.

        As with any ``torch.utils.checkpoint`` use, BatchNorm running statistics are updated
        once more by the recomputation in train mode; gradients are unchanged.
        """
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        """The linear head."""
        if self.fc is None:
            raise RuntimeError("a features_only model has no classifier")
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the head by a freshly initialized ``num_classes``-way linear layer."""
        _check_positive_int("num_classes", num_classes)
        if self.fc is None:
            raise RuntimeError("a features_only model has no classifier")
        weight = self.fc.weight
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes).to(
            device=weight.device, dtype=weight.dtype
        )

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            if isinstance(stage, nn.Sequential):
                for block in stage:
                    x = checkpoint(block, x, use_reentrant=False)
                return x
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stem's and every stage's outputs, indexed as ``feature_info`` of a full model."""
        features = []
        for i, stage in enumerate(self.stages()):
            if i == 1:
                x = self.maxpool(x)
            x = self._run_stage(stage, x)
            features.append(x)
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map, (B, num_features, H / 32, W / 32) on ImageNet inputs."""
        x = self._run_stage(self.stem, x)
        x = self.maxpool(x)
        for stage in self.stages()[1:]:
            x = self._run_stage(stage, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooling, dropout and the classifier; ``pre_logits`` stops before the classifier."""
        if self.fc is None or self.global_pool is None or self.head_drop is None:
            raise RuntimeError("a features_only model has no head")
        x = self.global_pool(x).flatten(1)
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> Any:
        if self.features_only:
            features = self.forward_intermediates(x)
            return [features[i] for i in self.out_indices]
        return self.forward_head(self.forward_features(x))


class ResNet(RedNet):
    """RedNet's convolution twin (the ``resnet*`` models): a 3 x 3 convolution wherever RedNet
    has an involution, and otherwise the same network; arguments as :class:`RedNet`'s, less
    ``kind``."""

    def __init__(self, layers: Sequence[int], **kwargs: Any) -> None:
        super().__init__(layers, kind="conv", **kwargs)


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} ({value!r}) must be a positive int")


def _model(depth: int, kind: str, cifar: bool) -> Callable[..., RedNet]:
    """The registered constructor of one depth, kind and input size."""

    cls = RedNet if kind == "involution" else ResNet

    def build(**kwargs: Any) -> RedNet:
        if cifar:
            kwargs.setdefault("stem_stride", 1)
        return cls(DEPTHS[depth], **kwargs)

    prefix = "rednet" if kind == "involution" else "resnet"
    build.__name__ = f"{prefix}{depth}{'_cifar' if cifar else ''}"
    size = "32 x 32 inputs (stride-1 stem, no max-pool)" if cifar else "224 x 224 inputs"
    what = "RedNet" if kind == "involution" else "ResNet baseline with RedNet's skeleton"
    build.__doc__ = f"{what}-{depth} for {size}."
    # The arguments create_model accepts for this name (it checks them against this signature).
    parameters = [
        p.replace(default=1) if cifar and p.name == "stem_stride" else p
        for p in inspect.signature(RedNet).parameters.values()
        if p.name not in ("layers", "kind")
    ]
    build.__signature__ = inspect.Signature(parameters, return_annotation=cls)  # type: ignore[attr-defined]
    return register_model(build)


for _depth in DEPTHS:
    for _kind in ("involution", "conv"):
        for _cifar in (False, True):
            _model(_depth, _kind, _cifar)

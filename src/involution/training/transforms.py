"""Image transforms on tensors: the paper's augmentation without torchvision.

Training on 32x32 data pads by 4 and crops back at random, then flips horizontally; training on
folders takes a random-resized crop (scale 0.08-1, aspect 3/4-4/3) then flips; evaluation on
folders resizes the short side to ``size / 0.875`` then takes the center crop (Li et al.,
CVPR 2021, following the standard ImageNet recipe). Every transform takes and returns a float
(C, H, W) tensor; randomness comes from ``torch``'s global generator, which checkpoints save.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "Compose",
    "Normalize",
    "center_crop",
    "eval_transform",
    "pad_crop_flip",
    "random_resized_crop_flip",
    "resize_short_side",
    "train_transform",
]

Transform = Callable[[torch.Tensor], torch.Tensor]


class Compose:
    """Applies transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        for transform in self.transforms:
            image = transform(image)
        return image


class Normalize:
    """``(image - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std


def _flip(image: torch.Tensor) -> torch.Tensor:
    return image.flip(-1) if torch.rand(()) < 0.5 else image


def pad_crop_flip(image: torch.Tensor, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Zero-pads by ``padding``, crops back to the input size at random, flips with p=0.5."""
    h, w = image.shape[-2:]
    padded = F.pad(image, (padding, padding, padding, padding))
    top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
    crop = padded[..., top : top + h, left : left + w]
    return _flip(crop) if flip else crop


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(
        image.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True
    ).squeeze(0)


def random_resized_crop_flip(
    image: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """A crop of random area and aspect ratio resized to ``size`` x ``size``, flipped at p=0.5.

    Ten tries at a crop that fits; then the central crop with the aspect ratio clamped to
    ``ratio`` (as the usual ImageNet recipe does).
    """
    h, w = image.shape[-2:]
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(()).uniform_(*scale).item()
        aspect = math.exp(torch.empty(()).uniform_(*log_ratio).item())
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, ()).item())
            left = int(torch.randint(0, w - cw + 1, ()).item())
            return _flip(_resize(image[..., top : top + ch, left : left + cw], (size, size)))
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif aspect > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return _flip(_resize(image[..., top : top + ch, left : left + cw], (size, size)))


def resize_short_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resizes so that the shorter side is ``size``, keeping the aspect ratio."""
    h, w = image.shape[-2:]
    if h <= w:
        return _resize(image, (size, max(1, round(w * size / h))))
    return _resize(image, (max(1, round(h * size / w)), size))


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` window (the image must be at least that large)."""
    h, w = image.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return image[..., top : top + size, left : left + size]


def train_transform(
    kind: str,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool = True,
    flip: bool = True,
) -> Transform:
    """The training transform of a data set kind (``"array"`` 32x32 data or ``"folder"``).

    With ``augment=False`` training data goes through the evaluation transform; ``flip=False``
    leaves out the horizontal flip (digits, where a mirrored digit is not the same digit).
    """
    if not augment:
        return eval_transform(kind, size, mean, std)
    if kind == "array":
        return Compose([functools.partial(pad_crop_flip, flip=flip), Normalize(mean, std)])
    return Compose([functools.partial(random_resized_crop_flip, size=size), Normalize(mean, std)])


def eval_transform(kind: str, size: int, mean: Sequence[float], std: Sequence[float]) -> Transform:
    """The evaluation transform: normalization only for 32x32 data, resize + center crop else."""
    if kind == "array":
        return Normalize(mean, std)
    resize = round(size / 0.875)
    return Compose(
        [
            functools.partial(resize_short_side, size=resize),
            functools.partial(center_crop, size=size),
            Normalize(mean, std),
        ]
    )

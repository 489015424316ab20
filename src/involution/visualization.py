"""Pictures of the kernels an involution layer generates for an image (cf. Li et al., CVPR 2021,
Fig. 2).

Each output pixel of an involution gets its own K x K kernel per group, generated from the image
content at that pixel. Two views of a layer's kernels are drawn:

* a **statistic map** per group: one number per pixel summarizing its kernel (by default the sum
  of its K x K values, as in the paper's figure), laid over the image;
* **kernel heat maps** at chosen pixels: the K x K values of each group's kernel there.

Every map has its colour scale beside it.

The sample image ``assets/sample.png`` was drawn procedurally for this project (a landscape of
simple shapes with edges and textures), so that the tool runs without any download.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .nn import Involution2d

__all__ = [
    "STATISTICS",
    "capture_kernel",
    "involution_layers",
    "kernel_statistic",
    "load_image",
    "plot_kernels",
    "sample_image",
]

# Per-pixel summaries of a kernel, over its K*K taps (dimension 2 of (B, G, K*K, Ho, Wo)).
STATISTICS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sum": lambda k: k.sum(2),
    "max": lambda k: k.amax(2),
    "std": lambda k: k.std(2),
    "norm": lambda k: k.norm(dim=2),
}

# ImageNet channel statistics, which the models are trained with.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def sample_image() -> Path:
    """Path of the sample image shipped with the package."""
    return Path(str(resources.files("involution") / "assets" / "sample.png"))


def involution_layers(model: nn.Module) -> dict[str, Involution2d]:
    """The 2D involution layers of ``model`` by their module name, in definition order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Involution2d)}


def load_image(
    path: str | os.PathLike[str], size: int, channels: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads an image, resizes its shorter side to ``size`` and crops the center square.

    Args:
        path: any file Pillow reads.
        size: side of the square result.
        channels: 3 (RGB) or 1 (grayscale), as the model takes.

    Returns:
        ``(batch, picture)``: the normalized (1, channels, size, size) model input and the
        (size, size, 3) RGB picture in [0, 1] to draw.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: Pillow cannot read the file, a bad ``size`` or ``channels``.
    """
    from PIL import Image, UnidentifiedImageError

    if size < 1:
        raise ValueError(f"size ({size}) must be >= 1")
    if channels not in (1, 3):
        raise ValueError(f"channels ({channels}) must be 1 or 3 to read an image")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image ({path}) is not a file")
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"image ({path}) cannot be read as an image: {error}") from error
    scale = size / min(rgb.size)
    width, height = max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))
    rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    rgb = rgb.crop((left, top, left + size, top + size))
    picture = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    picture = picture.view(size, size, 3).float() / 255
    x = picture.permute(2, 0, 1)
    if channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
        x = (x - 0.5) / 0.5
    else:
        x = (x - torch.tensor(_MEAN).view(3, 1, 1)) / torch.tensor(_STD).view(3, 1, 1)
    return x.unsqueeze(0), picture


def capture_kernel(model: nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    """The kernel that involution layer ``layer`` of ``model`` generates for ``images``.

    Runs ``model`` (in its current mode, without autograd) and records the layer's input.

    Returns:
        (B, G, K*K, Ho, Wo); tap ``u*K + v`` is row ``u``, column ``v`` of the K x K kernel.

    Raises:
        KeyError: ``layer`` is not an involution layer of ``model``; the message lists them.
    """
    layers = involution_layers(model)
    if layer not in layers:
        raise KeyError(
            f"layer ({layer!r}) is not an involution layer of {type(model).__name__}; "
            f"valid layers: {', '.join(layers) or '(none)'}"
        )
    module = layers[layer]
    captured: list[torch.Tensor] = []

    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(module.generate_kernel(args[0]))

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"layer {layer!r} did not run in the forward pass of the model")
    return captured[0]


def kernel_statistic(kernel: torch.Tensor, statistic: str = "sum") -> torch.Tensor:
    """One number per pixel and group: (B, G, K*K, Ho, Wo) -> (B, G, Ho, Wo).

    Raises:
        ValueError: an unknown statistic.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic ({statistic!r}) must be one of {list(STATISTICS)}")
    return STATISTICS[statistic](kernel)


def plot_kernels(
    picture: torch.Tensor,
    kernel: torch.Tensor,
    kernel_size: int | Sequence[int],
    pixels: Sequence[tuple[int, int]],
    groups: Sequence[int],
    path: str | os.PathLike[str],
    statistic: str = "sum",
    title: str = "",
) -> Path:
    """Draws the statistic maps and the kernels at ``pixels`` into a PNG.

    The first row shows the picture with the chosen pixels numbered, then one statistic map
    per group of ``groups``, each with its colour bar; each following row shows, for one pixel,
    the K x K kernel of each of those groups on one symmetric colour scale (white is 0), drawn
    as a colour bar at the end of the row.

    Args:
        picture: (S, S, 3) RGB in [0, 1], the image the kernel was generated from.
        kernel: (1, G, K*K, Ho, Wo), from :func:`capture_kernel`.
        kernel_size: K, or (Kh, Kw).
        pixels: (row, column) positions in the picture.
        groups: kernel groups to draw.
        path: PNG file to write.
        statistic: one of ``STATISTICS``.
        title: drawn above the figure.

    Raises:
        ValueError: a pixel outside the picture, a group outside the kernel, or a kernel whose
            shape does not fit ``kernel_size``.
        ImportError: matplotlib is missing (``involution[demo]``).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("drawing needs matplotlib: pip install 'involution[demo]'") from error
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if kernel.dim() != 5 or kernel.shape[0] != 1 or kernel.shape[2] != kh * kw:
        raise ValueError(f"kernel shape {tuple(kernel.shape)} must be (1, G, {kh * kw}, Ho, Wo)")
    size = picture.shape[0]
    n_groups, out_h, out_w = kernel.shape[1], kernel.shape[3], kernel.shape[4]
    for row, col in pixels:
        if not (0 <= row < picture.shape[0] and 0 <= col < picture.shape[1]):
            raise ValueError(
                f"pixel ({row}, {col}) must lie in the {picture.shape[0]}x{picture.shape[1]} image"
            )
    bad = [g for g in groups if not 0 <= g < n_groups]
    if bad or not groups:
        raise ValueError(f"groups ({list(groups)}) must be among 0..{n_groups - 1}")
    kernel = kernel.float().cpu()
    maps = kernel_statistic(kernel, statistic)[0]  # (G, Ho, Wo)
    # Upsample with nearest neighbours so that each kernel map cell covers its image area.
    overlays = F.interpolate(maps[None], size=(size, picture.shape[1]), mode="nearest")[0]
    cols = len(groups) + 1
    # Constrained layout leaves room for the colour bars (tight_layout cannot).
    figure = Figure(figsize=(2.3 * cols, 1.9 * (len(pixels) + 1) + 0.4), layout="constrained")
    axes = figure.subplots(len(pixels) + 1, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].imshow(picture.numpy())
    axes[0, 0].set_title("image", fontsize=8)
    for i, (row, col) in enumerate(pixels, start=1):
        axes[0, 0].plot(col, row, "o", markersize=9, markerfacecolor="none", color="white")
        axes[0, 0].annotate(
            str(i), (col, row), color="white", fontsize=8, xytext=(5, 5), textcoords="offset points"
        )
    for j, g in enumerate(groups, start=1):
        axes[0, j].imshow(picture.numpy().mean(-1), cmap="gray", alpha=0.5)
        shown = axes[0, j].imshow(overlays[g].numpy(), cmap="jet", alpha=0.6)
        axes[0, j].set_title(f"group {g}: {statistic}", fontsize=8)
        figure.colorbar(shown, ax=axes[0, j], fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    for i, (row, col) in enumerate(pixels, start=1):
        r, c = row * out_h // size, col * out_w // picture.shape[1]
        axes[i, 0].text(
            0.5,
            0.5,
            f"pixel {i}\n({row}, {col})\nkernel at ({r}, {c})",
            ha="center",
            va="center",
            fontsize=8,
            transform=axes[i, 0].transAxes,
        )
        axes[i, 0].set_axis_off()
        # One symmetric color scale per pixel: white is 0, groups compare by color.
        limit = kernel[0, list(groups), :, r, c].abs().max().item() or 1.0
        for j, g in enumerate(groups, start=1):
            values = kernel[0, g, :, r, c].view(kh, kw)
            heat = axes[i, j].imshow(values.numpy(), cmap="coolwarm", vmin=-limit, vmax=limit)
            axes[i, j].set_title(f"group {g}", fontsize=8)
        bar = figure.colorbar(heat, ax=list(axes[i, 1:]), fraction=0.046, pad=0.02)
        bar.ax.tick_params(labelsize=6)
    if title:
        figure.suptitle(title, fontsize=9)
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path

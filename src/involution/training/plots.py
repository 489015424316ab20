"""PNG plots: training curves of one or more runs, and involution kernels at a few pixels.

matplotlib is imported inside the functions with the non-interactive Agg backend, so importing
this module costs nothing and plotting works without a display.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn import Involution2d

__all__ = ["first_involution", "plot_history", "plot_kernels"]

_PANELS = (
    ("loss", ("train_loss", "test_loss"), "cross-entropy"),
    ("accuracy", ("train_acc", "test_top1"), "top-1 accuracy"),
    ("learning rate", ("lr",), "lr"),
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(
    histories: Mapping[str, Sequence[Mapping[str, float]]], path: str | os.PathLike
) -> Path:
    """Loss, accuracy and learning rate per epoch, one line style per run.

    Args:
        histories: run name -> list of per-epoch rows (keys ``epoch``, ``train_loss``,
            ``test_loss``, ``train_acc``, ``test_top1``, ``lr``).
        path: the PNG to write.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(5 * len(_PANELS), 4))
    for ax, (title, keys, ylabel) in zip(axes, _PANELS, strict=True):
        for run, rows in histories.items():
            epochs = [row["epoch"] for row in rows]
            for key in keys:
                if rows and key in rows[0]:
                    label = f"{run} {key}" if len(histories) > 1 else key
                    ax.plot(epochs, [row[key] for row in rows], marker=".", label=label)
        if title == "loss":
            ax.set_yscale("log")  # early test losses can be orders of magnitude larger
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def first_involution(model: nn.Module) -> tuple[str, Involution2d]:
    """The first :class:`Involution2d` of ``model`` (in module order) and its name.

    Raises:
        ValueError: the model has no involution layer.
    """
    for name, module in model.named_modules():
        if isinstance(module, Involution2d):
            return name, module
    raise ValueError(f"model {type(model).__name__} has no Involution2d layer")


@torch.no_grad()
def plot_kernels(
    model: nn.Module,
    image: torch.Tensor,
    path: str | os.PathLike,
    pixels: Sequence[tuple[float, float]] = ((0.25, 0.25), (0.5, 0.5), (0.75, 0.5), (0.5, 0.75)),
) -> Path:
    """Heat maps of the first involution layer's kernel at a few pixels of one image.

    The input image is shown with the chosen pixels marked; then, per pixel, the K x K kernel
    of the layer's first group (Li et al., CVPR 2021, Fig. 2: a different kernel per pixel).

    Args:
        model: a model holding an :class:`Involution2d`, in eval mode afterwards.
        image: one (C, H, W) input, normalized as for the model.
        path: the PNG to write.
        pixels: (row, column) positions as fractions of the layer's output size.
    """
    plt = _pyplot()
    name, layer = first_involution(model)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    model.eval()
    try:
        model(image.unsqueeze(0))
    finally:
        handle.remove()
    kernel = layer.generate_kernel(captured[0])[0, 0]  # (K*K, Ho, Wo), first group
    kernel = kernel.unflatten(0, layer.kernel_size).float()
    ho, wo = kernel.shape[-2:]
    fig, axes = plt.subplots(1, len(pixels) + 1, figsize=(3 * (len(pixels) + 1), 3.2))
    shown = image.float()
    shown = (shown - shown.min()) / (shown.max() - shown.min() + 1e-12)
    axes[0].imshow(shown.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray")
    axes[0].set_title("input")
    scale_h, scale_w = image.shape[-2] / ho, image.shape[-1] / wo
    for ax, (fy, fx) in zip(axes[1:], pixels, strict=True):
        y, x = min(int(fy * ho), ho - 1), min(int(fx * wo), wo - 1)
        axes[0].plot((x + 0.5) * scale_w - 0.5, (y + 0.5) * scale_h - 0.5, "r+", markersize=12)
        axes[0].annotate(f"({y},{x})", ((x + 0.5) * scale_w, (y + 0.5) * scale_h), color="red")
        im = ax.imshow(kernel[:, :, y, x].numpy(), cmap="RdBu_r")
        ax.set_title(f"kernel at ({y},{x})")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    fig.suptitle(f"{name}: {layer.kernel_size[0]}x{layer.kernel_size[1]} kernels, group 0")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

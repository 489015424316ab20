"""PNG plots of training curves (loss, accuracy, learning rate) of one or more runs.

matplotlib is imported inside the functions with the non-interactive Agg backend, so importing
this module costs nothing and plotting works without a display.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_history"]

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

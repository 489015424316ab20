"""The configuration of a training run, checked before anything is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .datasets import DATA_KINDS
from .optim import OPTIMIZERS

__all__ = ["AMP_DTYPES", "TrainConfig", "check_model_kwargs"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Builder arguments that train and eval set themselves, and why.
_RESERVED_MODEL_ARGS = {
    "num_classes": "the number of classes comes from --data (see --reset-classifier to "
    "fine-tune weights made for another count)",
    "in_chans": "the input channels come from --data",
    "pretrained": "use --pretrained PATH",
    "features_only": "training needs the classifier",
    "out_indices": "training needs the classifier",
}


def check_model_kwargs(model: str, model_kwargs: dict[str, Any]) -> None:
    """Checks ``--model`` and the keys of ``--model-arg`` before anything is built.

    Raises:
        ValueError: an unknown model (close names listed), a key that train and eval set
            themselves, or a key the model does not take (the ones it takes listed).
    """
    from ..models._builder import check_model_kwargs as check_builder_kwargs
    from ..models._registry import get_model_entrypoint

    try:
        get_model_entrypoint(model)
    except ValueError as err:
        raise ValueError(f"--model: {err}") from None
    for key, why in _RESERVED_MODEL_ARGS.items():
        if key in model_kwargs:
            raise ValueError(f"--model-arg {key}={model_kwargs[key]!r} is not accepted: {why}")
    try:
        check_builder_kwargs(model, model_kwargs)
    except ValueError as err:
        raise ValueError(f"--model-arg: {err}") from None


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in every checkpoint.

    ``batch_size`` is the global batch of one optimizer step: each of the ``world_size``
    processes runs ``batch_size / (world_size * grad_accum)`` images per forward pass, so the
    same command trains the same way on one process or many. ``lr=None`` means the paper's
    0.1 per 256 images of global batch (0.8 at 2048).
    """

    model: str
    data: str
    data_dir: str | None = None
    output_dir: str = "runs/train"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    reset_classifier: bool = False
    epochs: int = 100
    batch_size: int = 128
    lr: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float | None = None
    warmup_start: float = 0.25
    label_smoothing: float = 0.1
    augment: bool = True
    image_size: int = 224
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    clip_grad: float | None = None
    grad_accum: int = 1
    seed: int = 0
    deterministic: bool = False
    workers: int | None = None
    device: str | None = None
    sync_bn: bool = False
    resume: str | None = None
    overwrite: bool = False
    download: bool = False
    download_url: str | None = None
    download_md5: str | None = None
    tensorboard: bool = True
    plots: bool = True

    def check(self) -> None:
        """Raises ValueError naming the first invalid option, its value and what is expected."""
        if self.data not in DATA_KINDS:
            raise ValueError(f"--data ({self.data!r}) must be one of {list(DATA_KINDS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer ({self.optimizer!r}) must be one of {list(OPTIMIZERS)}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"--amp ({self.amp!r}) must be one of {list(AMP_DTYPES)}")
        for name in ("epochs", "batch_size", "grad_accum", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} ({value!r}) must be an int >= 1")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr ({self.lr}) must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay ({self.weight_decay}) must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--label-smoothing ({self.label_smoothing}) must lie in [0, 1)")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"--warmup-epochs ({self.warmup_epochs}) must lie in [0, --epochs ({self.epochs}))"
            )
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"--clip-grad ({self.clip_grad}) must be > 0")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers ({self.workers}) must be >= 0")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"--device ({self.device!r}) must be 'cpu' or 'cuda'")
        if self.reset_classifier and self.pretrained is None:
            raise ValueError("--reset-classifier needs --pretrained PATH (the weights to load)")
        check_model_kwargs(self.model, self.model_kwargs)

    def resolved_lr(self) -> float:
        """The learning rate: ``lr``, or 0.1 per 256 images of global batch."""
        return self.lr if self.lr is not None else 0.1 * self.batch_size / 256

    def resolved_warmup_epochs(self) -> float:
        """``warmup_epochs``, or 5 epochs (the paper's) capped at a tenth of the run."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return min(5.0, self.epochs / 10)

    def as_dict(self) -> dict[str, Any]:
        """The configuration as plain data (for checkpoints and JSON)."""
        return dataclasses.asdict(self)

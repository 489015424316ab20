"""Training and evaluation of the model zoo: data, loop, checkpoints, distributed runs, reports.

The command line (``involution train``, ``eval`` and ``demo``) is a thin layer over
:func:`fit` and :func:`evaluate`.
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .datasets import DATA_KINDS, DataSets, load_data
from .engine import EvalResult, NonFiniteLossError, evaluate, train_one_epoch
from .fit import FitResult, build_model, check_model_fits_data, fit

__all__ = [
    "DATA_KINDS",
    "CheckpointError",
    "DataSets",
    "EvalResult",
    "FitResult",
    "NonFiniteLossError",
    "TrainConfig",
    "build_model",
    "check_model_fits_data",
    "evaluate",
    "fit",
    "load_checkpoint",
    "load_data",
    "save_checkpoint",
    "train_one_epoch",
]

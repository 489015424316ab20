"""Runs `involution train` arguments through fit() and saves this rank's final state.

Used by test_training_distributed.py, once under torchrun and once as a single process.
Usage: python ddp_train_worker.py STATE_DIR TRAIN_ARGS...
"""

from __future__ import annotations

import os
import sys

import torch

from involution.cli.__main__ import build_parser
from involution.cli.train import config_from_args
from involution.training import fit

if __name__ == "__main__":
    state_dir = sys.argv[1]
    args = build_parser().parse_args(["train", *sys.argv[2:]])
    result = fit(config_from_args(args))
    rank = int(os.environ.get("RANK", "0"))
    torch.save(result.model.state_dict(), os.path.join(state_dir, f"rank{rank}.pt"))

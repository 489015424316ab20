"""Checkpoints: atomic writes, exact RNG round trip, clear errors on corrupt files."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from involution.training import checkpoint as ckpt
from involution.training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _state(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    model = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(4, generator=gen)}
    return {
        "model": model,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "scheduler": {"last_epoch": 3},
        "scaler": None,
        "epoch": 2,
        "step": 7,
        "rng": [capture_rng_state()],
        "config": {"model": "m", "seed": seed},
        "num_classes": 4,
        "in_chans": 3,
        "history": [{"epoch": 1.0, "train_loss": 0.5}],
    }


def test_round_trip(tmp_path):
    path = save_checkpoint(_state(1), tmp_path / "run" / "last.pt")
    loaded = load_checkpoint(path)
    torch.testing.assert_close(loaded["model"], _state(1)["model"], rtol=0, atol=0)
    assert (loaded["epoch"], loaded["step"], loaded["history"]) == (2, 7, _state(1)["history"])
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_rng_states_restore_exactly():
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_a_clear_error_and_left_alone(tmp_path, damage):
    path = save_checkpoint(_state(2), tmp_path / "last.pt")
    data = path.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "garbage": b"x" * 300, "empty": b""}[damage]
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError, match=r"last\.pt"):
        load_checkpoint(path)
    assert path.read_bytes() == damaged


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an involution training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


def test_failed_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(_state(3), tmp_path / "last.pt")
    good = path.read_bytes()

    def crash(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_state(4), path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]

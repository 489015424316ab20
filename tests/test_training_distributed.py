"""torchrun with 2 CPU processes (gloo): DDP + DistributedSampler against a single process.

BatchNorm normalizes with per-process batch statistics, and PyTorch's SyncBatchNorm does not
run on the CPU, so the comparison uses a configuration where it is exact: one image per
process per step (global batch 2) against one process with --grad-accum 2 (two micro-batches
of one image). DistributedSampler gives rank r the positions r, r+2, ... of one shared
permutation, which are exactly the single process's micro-batches in order, so every forward
pass sees the same images and the averaged gradients agree up to float rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from involution.training import build_model
from involution.training.checkpoint import load_checkpoint
from involution.training.fit import seed_everything
from training_data import write_cifar10

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def _train_args(data_dir: Path, out: Path) -> list[str]:
    return [
        "--model", "resnet26_cifar", "--model-arg", "base_width=16", "--data", "cifar10",
        "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "2",
        "--batch-size", "2", "--lr", "0.02", "--no-augment", "--seed", "1", "--device", "cpu",
        "--no-tensorboard",
    ]  # fmt: skip


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    data = write_cifar10(tmp_path / "data", n_train=12, n_test=6)
    env = dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{HERE}", OMP_NUM_THREADS="1")
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp_dir.mkdir()
    single_dir.mkdir()
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(HERE / "ddp_train_worker.py"),
         str(ddp_dir), *_train_args(data, ddp_dir / "run")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, str(HERE / "ddp_train_worker.py"), str(single_dir),
         *_train_args(data, single_dir / "run"), "--grad-accum", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]

    rank0 = torch.load(ddp_dir / "rank0.pt")
    rank1 = torch.load(ddp_dir / "rank1.pt")
    reference = torch.load(single_dir / "rank0.pt")
    for key in rank0:  # parameters and BatchNorm buffers
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ at {key}"
    # Only rank 0 wrote a checkpoint, and it holds rank 0's weights.
    saved = load_checkpoint(ddp_dir / "run" / "last.pt")["model"]
    assert all(torch.equal(saved[k], rank0[k]) for k in rank0)
    assert not list(ddp_dir.glob("run/.*tmp*"))
    params = [k for k in rank0 if "running" not in k and "num_batches" not in k]
    seed_everything(1)
    init = build_model("resnet26_cifar", 10, 3, model_kwargs={"base_width": 16}).state_dict()
    moved = max((reference[k] - init[k]).abs().max().item() for k in params)
    assert moved > 1e-3, "training did not move the weights; the comparison would be empty"
    for key in params:
        torch.testing.assert_close(rank0[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)

"""`involution train` and `eval` end to end, in subprocesses: exact resume after SIGKILL,
evaluation of the trained weights, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from involution.cli.__main__ import main
from involution.training.checkpoint import load_checkpoint, save_checkpoint
from training_data import write_cifar10, write_image_folder

SRC = Path(__file__).resolve().parents[1] / "src"
MODEL = ["--model", "rednet26_cifar", "--model-arg", "base_width=16"]
EPOCHS = 3


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _train_args(data_dir: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "involution", "train", *MODEL, "--data", "cifar10",
        "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", str(EPOCHS),
        "--batch-size", "8", "--lr", "0.05", "--deterministic", "--seed", "3",
        "--no-tensorboard", "--device", "cpu",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"), n_train=64, n_test=16)


@pytest.fixture(scope="module")
def full_run(cifar_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    subprocess.run(_train_args(cifar_dir, out), env=_env(), check=True, capture_output=True)
    return out


def test_sigkill_mid_run_then_resume_auto_reaches_the_same_weights(cifar_dir, full_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_args(cifar_dir, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.05)
    time.sleep(0.3)  # into the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    interrupted = load_checkpoint(out / "last.pt")
    assert interrupted["epoch"] < EPOCHS, "the kill came too late to test a resume"

    resumed = subprocess.run(
        [*_train_args(cifar_dir, out), "--resume", "auto"], env=_env(), capture_output=True
    )
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert f"resumed from {out / 'last.pt'}" in resumed.stderr.decode()
    a = load_checkpoint(full_run / "last.pt")
    b = load_checkpoint(out / "last.pt")
    assert a["epoch"] == b["epoch"] == EPOCHS and a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    assert (out / "metrics.csv").read_text().count("\n") == EPOCHS + 1


def test_outputs_and_eval_of_the_trained_weights(cifar_dir, full_run, capsys):
    for name in ("metrics.csv", "metrics.json", "curves.png", "model.safetensors", "last.pt"):
        assert (full_run / name).stat().st_size > 0, name
    trained = json.loads((full_run / "metrics.json").read_text())
    code = main(
        ["eval", *MODEL, "--weights", str(full_run / "last.pt"), "--data", "cifar10",
         "--data-dir", str(cifar_dir), "--output", str(full_run / "eval.json")]
    )  # fmt: skip
    assert code == 0
    result = json.loads((full_run / "eval.json").read_text())
    assert result["samples"] == 16
    assert result["top1"] == pytest.approx(trained["test"]["top1"])
    assert result["top5"] == pytest.approx(trained["test"]["top5"])
    assert result["loss"] == pytest.approx(trained["test"]["loss"], rel=1e-5)
    assert result["images_per_second"] > 0
    assert "top-1" in capsys.readouterr().out
    # The final weights file gives the same numbers.
    code = main(
        ["eval", *MODEL, "--weights", str(full_run / "model.safetensors"), "--data", "cifar10",
         "--data-dir", str(cifar_dir), "--output", str(full_run / "eval2.json")]
    )  # fmt: skip
    assert code == 0
    again = json.loads((full_run / "eval2.json").read_text())
    assert again["top1"] == result["top1"] and again["loss"] == pytest.approx(result["loss"])


def test_corrupt_checkpoint_stops_the_resume_and_stays(cifar_dir, full_run, tmp_path, caplog):
    out = tmp_path / "corrupt"
    out.mkdir()
    data = (full_run / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 3])
    args = [*_train_args(cifar_dir, out)[3:], "--resume", "auto"]
    assert main(args) == 2
    assert "corrupt or truncated" in caplog.text
    assert (out / "last.pt").read_bytes() == data[: len(data) // 3]


def test_num_classes_mismatch_is_a_clear_error(full_run, tmp_path, caplog):
    folder = write_image_folder(tmp_path / "folder")
    code = main(
        ["eval", *MODEL, "--weights", str(full_run / "last.pt"), "--data", "folder",
         "--data-dir", str(folder), "--image-size", "32", "--workers", "0"]
    )  # fmt: skip
    assert code == 2
    assert "outputs 10 classes but --data folder has 2 classes" in caplog.text


def test_bad_input_exits_non_zero_with_a_message(tmp_path, caplog, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *MODEL, "--data", "digits", "--no-such-option"])
    assert exit_info.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err
    base = ["train", *MODEL, "--output-dir", str(tmp_path / "o"), "--epochs", "1"]
    assert main([*base, "--data", "cifar10", "--data-dir", str(tmp_path / "none")]) == 2
    assert "pass --download" in caplog.text
    assert main([*base, "--data", "folder", "--data-dir", str(tmp_path / "none")]) == 2
    assert "does not exist" in caplog.text
    assert main([*base, "--data", "digits", "--model", "no_such_net"]) == 2
    assert "--model ('no_such_net') is not a registered model" in caplog.text
    assert main([*base, "--data", "digits", "--batch-size", "0"]) == 2
    assert "--batch-size (0) must be an int >= 1" in caplog.text
    assert main([*base, "--data", "digits", "--amp", "fp16", "--device", "cpu"]) == 2
    assert "--amp fp16 needs a CUDA device" in caplog.text


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(cifar_dir, tmp_path):
    out = tmp_path / "nan"
    args = _train_args(cifar_dir, out)
    args[args.index("--epochs") + 1] = "1"
    subprocess.run(args, env=_env(), check=True, capture_output=True)
    # A learning rate that diverges, in the state the resumed run continues from.
    state = load_checkpoint(out / "last.pt")
    state["scheduler"]["base_lrs"] = [1e30 for _ in state["scheduler"]["base_lrs"]]
    save_checkpoint(state, out / "last.pt")
    good = (out / "last.pt").read_bytes()
    args[args.index("--epochs") + 1] = "3"
    run = subprocess.run([*args, "--resume", "auto"], env=_env(), capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    assert "at epoch 2, optimizer step" in run.stderr and "training stopped" in run.stderr
    assert f"the last good checkpoint is {out / 'last.pt'}" in run.stderr
    assert (out / "last.pt").read_bytes() == good


def test_folder_training_skips_and_reports_corrupt_images(tmp_path, capsys):
    root = write_image_folder(tmp_path / "folder", per_class=3)
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code = main(
        ["train", *MODEL, "--data", "folder", "--data-dir", str(root), "--image-size", "32",
         "--workers", "2", "--epochs", "1", "--batch-size", "4", "--output-dir",
         str(tmp_path / "out"), "--no-tensorboard"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "skipped 1 unreadable image files" in out and "broken.png" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["skipped_files"] == [str(root / "train" / "dog" / "broken.png")]


def test_bf16_autocast_and_channels_last_train(cifar_dir, tmp_path):
    code = main(
        ["train", *MODEL, "--data", "cifar10", "--data-dir", str(cifar_dir), "--epochs", "1",
         "--batch-size", "16", "--amp", "bf16", "--channels-last", "--clip-grad", "1.0",
         "--grad-accum", "2", "--optimizer", "adamw", "--lr", "1e-3", "--device", "cpu",
         "--output-dir", str(tmp_path), "--no-tensorboard"]
    )  # fmt: skip
    assert code == 0
    row = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 < row["test"]["loss"] < 100 and row["steps"] == 64 // 16

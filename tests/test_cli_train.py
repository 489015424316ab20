"""`involution train` and `eval` end to end, in subprocesses: exact resume after SIGKILL,
evaluation of the trained weights, and clear errors on bad input."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
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
    assert "--model: model name ('no_such_net') is not a registered model" in caplog.text
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


# What a new user hit (issue 14): clean errors, no silent overwrite, resume, fine-tuning.


@pytest.fixture(scope="module")
def tiny():
    """The tiny registered model, for in-process runs of the whole module."""
    from tiny_model import register_tiny_model

    with pytest.MonkeyPatch.context() as patch:
        yield register_tiny_model(patch)


def _tiny_args(tiny: str, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", tiny, "--data", "digits", "--epochs", "1", "--batch-size", "256",
        "--output-dir", str(out), "--no-tensorboard", "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def digits_run(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    assert main(_tiny_args(tiny, out, "--epochs", "2")) == 0
    return out


def test_bad_model_arg_is_one_line_naming_the_accepted_ones(tiny, tmp_path, caplog, capsys):
    assert main(_tiny_args(tiny, tmp_path, "--model-arg", "foo=1")) == 2
    assert (
        f"--model-arg: model argument 'foo' is not an argument of {tiny}; it takes base_width"
        in caplog.text
    )
    caplog.clear()
    assert main(_tiny_args(tiny, tmp_path, "--model-arg", "num_classes=3")) == 2
    assert "--model-arg num_classes=3 is not accepted: the number of classes comes from --data" in (
        caplog.text
    )
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "last.pt").exists()


def test_unknown_model_names_close_ones_and_list_models(tiny, tmp_path, caplog):
    assert main(_tiny_args(tiny, tmp_path, "--model", "rednet26_cifr")) == 2
    assert "did you mean 'rednet26_cifar'" in caplog.text
    assert "`involution list-models`" in caplog.text


def test_output_dir_naming_a_file_is_a_clear_error(tiny, tmp_path, caplog):
    (tmp_path / "taken").write_text("notes")
    assert main(_tiny_args(tiny, tmp_path / "taken")) == 2
    assert f"--output-dir ({tmp_path / 'taken'}) is an existing file" in caplog.text


def test_a_previous_run_is_not_overwritten_without_overwrite(tiny, digits_run, tmp_path, caplog):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(digits_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(_tiny_args(tiny, out, "--seed", "1")) == 2
    assert "holds a previous run (last.pt, model.safetensors)" in caplog.text
    assert "--resume auto" in caplog.text and "--overwrite" in caplog.text
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # Weights alone (last.pt deleted) are protected too, also from --resume auto.
    (out / "last.pt").unlink()
    assert main(_tiny_args(tiny, out, "--resume", "auto")) == 2
    assert (out / "model.safetensors").read_bytes() == before["model.safetensors"]
    # --overwrite replaces the run.
    caplog.clear()
    assert main(_tiny_args(tiny, out, "--seed", "1", "--overwrite")) == 0
    assert "--overwrite: deleted the previous run's model.safetensors, metrics.csv" in caplog.text
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert load_checkpoint(out / "last.pt")["config"]["seed"] == 1


def test_resume_with_more_epochs_rebuilds_the_schedule_as_it_says(
    tiny, digits_run, tmp_path, caplog
):
    import shutil

    from involution.training.optim import warmup_cosine

    out = tmp_path / "more"
    shutil.copytree(digits_run, out)
    saved = load_checkpoint(out / "last.pt")
    steps = saved["step"] // 2  # steps per epoch
    assert saved["epoch"] == 2 and steps > 2
    args = _tiny_args(tiny, out, "--epochs", "4", "--resume", "auto", "--lr", "0.5")
    assert main(args) == 0
    # The schedule is rebuilt for 4 epochs (warmup: a tenth of the run); the lr stays the saved
    # run's (0.1 per 256 images), as the warning says.
    warmup = round(0.4 * steps)
    expected = [0.1 * warmup_cosine(e * steps, 4 * steps, warmup, 0.25) for e in (2, 3, 4)]
    history = load_checkpoint(out / "last.pt")["history"]
    assert history[1]["lr"] == 0  # where the saved 2-epoch run ended
    assert [row["lr"] for row in history[2:]] == pytest.approx(expected[1:])
    assert (
        f"epochs (2 -> 4) changed: the learning-rate schedule is rebuilt for 4 epochs from step "
        f"{2 * steps}, so the learning rate goes from 0 (the saved run's) to {expected[0]:.4g}"
    ) in caplog.text
    assert "lr (None -> 0.5) ignored" in caplog.text


def test_fine_tuning_to_new_classes_with_reset_classifier(cifar_dir, tmp_path, caplog):
    from safetensors.torch import load_file

    from involution.models import load_weights
    from involution.training import build_model

    caplog.set_level(logging.INFO)
    source = tmp_path / "cifar"
    args = ["--data", "cifar10", "--data-dir", str(cifar_dir), "--batch-size", "32"]
    assert main([*_tiny_args(MODEL[1], source, *MODEL[2:]), *args]) == 0
    pretrained = ["--pretrained", str(source / "model.safetensors")]
    folder = write_image_folder(tmp_path / "folder")
    data = ["--data", "folder", "--data-dir", str(folder), "--image-size", "32", "--workers", "0"]
    base = [*_tiny_args(MODEL[1], tmp_path / "pets", *MODEL[2:], "--batch-size", "4"), *data]
    assert main([*base, *pretrained]) == 2
    assert "has a classifier for 10 classes but the data has 2" in caplog.text
    assert "pass --reset-classifier" in caplog.text
    assert main([*base, "--reset-classifier"]) == 2
    assert "--reset-classifier needs --pretrained" in caplog.text
    caplog.clear()
    assert main([*base, *pretrained, "--reset-classifier"]) == 0
    assert "loaded every weight of" in caplog.text
    assert "except the classifier (10 classes in the file), which is new for 2 classes" in (
        caplog.text
    )
    assert load_weights(tmp_path / "pets" / "model.safetensors").model_config["num_classes"] == 2
    # What build_model loads: every weight but the head's.
    model = build_model(MODEL[1], 2, 3, str(source / "model.safetensors"), True, {"base_width": 16})
    saved = load_file(source / "model.safetensors")
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            assert value.shape[0] == 2
        else:
            assert torch.equal(value, saved[key]), key


def test_eval_of_weights_for_other_channels_is_a_clear_error(tiny, digits_run, tmp_path, caplog):
    folder = write_image_folder(tmp_path / "folder")
    code = main(
        ["eval", "--model", tiny, "--weights", str(digits_run / "model.safetensors"), "--data",
         "folder", "--data-dir", str(folder), "--image-size", "32", "--workers", "0"]
    )  # fmt: skip
    assert code == 2
    assert "the model takes 1-channel images but --data folder has 3-channel images" in caplog.text


def test_eval_without_model_reads_the_name_from_the_weights(tiny, digits_run, tmp_path, capsys):
    for weights in ("model.safetensors", "last.pt"):
        output = tmp_path / f"{weights}.json"
        argv = ["eval", "--weights", str(digits_run / weights), "--data", "digits"]
        assert main([*argv, "--output", str(output)]) == 0
        assert json.loads(output.read_text())["model"] == tiny
        assert f"{tiny} on digits" in capsys.readouterr().out
    assert main([*argv, "--model", "rednet26_cifar"]) == 2


def test_eval_model_arg_set_by_the_data_is_refused(tiny, digits_run, caplog):
    argv = ["eval", "--weights", str(digits_run / "last.pt"), "--data", "digits"]
    assert main([*argv, "--model-arg", "in_chans=3"]) == 2
    assert "--model-arg in_chans=3 is not accepted: the input channels come from --data" in (
        caplog.text
    )


@pytest.mark.parametrize("val_readable", [True, False])
def test_no_readable_training_image_stops_before_training(tiny, tmp_path, caplog, val_readable):
    root = write_image_folder(tmp_path / "folder", per_class=2)
    broken = [p for p in root.rglob("*.*") if val_readable is False or "train" in p.parts]
    for path in broken:
        path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    data = ["--data", "folder", "--data-dir", str(root), "--image-size", "32", "--workers", "0"]
    assert main([*_tiny_args(tiny, tmp_path / "out", "--batch-size", "2"), *data]) == 2
    assert "the training set of --data folder has no readable image: none of its 4" in caplog.text
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_top5_only_with_more_than_5_classes(tiny, digits_run, tmp_path, capsys):
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert metrics["test"]["top5"] is not None  # 10 digits
    folder = write_image_folder(tmp_path / "folder")
    data = ["--data", "folder", "--data-dir", str(folder), "--image-size", "32", "--workers", "0"]
    out = tmp_path / "two"
    assert main([*_tiny_args(tiny, out, "--batch-size", "4"), *data]) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "top-5" not in printed
    assert json.loads((out / "metrics.json").read_text())["test"]["top5"] is None
    assert "test_top5" not in (out / "metrics.csv").read_text()


def test_weights_get_the_permissions_of_the_other_outputs(digits_run):
    import stat

    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in digits_run.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == modes["last.pt"] == modes["metrics.json"], modes


def test_progress_bar_follows_stderr_not_stdout(monkeypatch):
    pytest.importorskip("tqdm")
    from involution.training import engine

    loader = [1, 2, 3]
    monkeypatch.setattr(engine.sys.stdout, "isatty", lambda: False, raising=False)
    monkeypatch.setattr(engine.sys.stderr, "isatty", lambda: True, raising=False)
    bar = engine._progress(loader, "epoch 1", True)
    assert bar is not loader and bar.total == 3  # a total, so tqdm shows an ETA
    bar.close()
    assert engine._progress(loader, "epoch 1", False) is loader  # not rank 0
    monkeypatch.setattr(engine.sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(engine.sys.stderr, "isatty", lambda: False, raising=False)
    assert engine._progress(loader, "epoch 1", True) is loader


def test_verbose_after_the_subcommand_and_version(capsys):
    from involution.cli.__main__ import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo", "-v"]).verbose is True
    assert parser.parse_args(["-v", "demo"]).verbose is True
    assert parser.parse_args(["demo"]).verbose is False
    assert parser.parse_args(["bench", "model", "-v"]).verbose is True
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--version"])
    assert exit_info.value.code == 0
    import involution

    assert capsys.readouterr().out.strip() == f"involution {involution.__version__}"


def test_list_models(capsys):
    assert main(["list-models", "rednet26*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["rednet26", "rednet26_cifar"]
    assert "RedNet-26 for 32 x 32 inputs" in lines[1]
    assert main(["list-models", "vgg*"]) == 1
    assert "no model name matches 'vgg*'" in capsys.readouterr().err


def test_cpu_training_runs_with_freed_memory_kept(tiny, tmp_path, monkeypatch):
    # The module, which the package's ``fit`` function hides.
    fit_module = importlib.import_module("involution.training.fit")
    state = {"inside": False, "entered": 0, "epochs_inside": 0}
    real_keep, real_epoch = fit_module.keep_freed_memory, fit_module.train_one_epoch

    @contextlib.contextmanager
    def keep(*args):
        state["entered"] += 1
        with real_keep(*args) as kept:
            state["inside"] = True
            try:
                yield kept
            finally:
                state["inside"] = False

    def epoch(*args, **kwargs):
        state["epochs_inside"] += state["inside"]
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(fit_module, "keep_freed_memory", keep)
    monkeypatch.setattr(fit_module, "train_one_epoch", epoch)
    assert main(_tiny_args(tiny, tmp_path, "--epochs", "2")) == 0
    assert state == {"inside": False, "entered": 1, "epochs_inside": 2}

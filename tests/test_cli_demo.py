"""`involution demo` (shortened to one epoch) and the help of the subcommands."""

from __future__ import annotations

import json

import pytest

from involution.cli.__main__ import build_parser, main


def test_demo_writes_table_curves_and_kernels(tmp_path, capsys):
    # A previous demo's outputs: the demo replaces them (a training run would refuse).
    (tmp_path / "rednet26_cifar").mkdir()
    (tmp_path / "rednet26_cifar" / "model.safetensors").write_bytes(b"old")
    assert main(["demo", "--epochs", "1", "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "rednet26_cifar" / "model.safetensors").read_bytes() != b"old"
    out = capsys.readouterr().out
    assert "| rednet26_cifar |" in out and "| resnet26_cifar |" in out
    for name in ("curves.png", "kernels.png", "results.json"):
        assert (tmp_path / name).read_bytes()[:4] in (b"\x89PNG", b"{\n  ")
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["rednet26_cifar", "resnet26_cifar"]
    # Same skeleton, involution instead of 3x3 convolution: fewer parameters and MACs.
    assert rows[0]["params"] < rows[1]["params"] and rows[0]["macs"] < rows[1]["macs"]
    assert all(0 <= r["top1"] <= 1 and r["train_seconds"] > 0 for r in rows)


@pytest.mark.parametrize("command", ["demo", "train", "eval", "list-models"])
def test_help_of_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: involution {command}" in text and "--verbose" in text

"""Export to ONNX and torch.export: standard operators, dynamic sizes, parity with PyTorch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from involution import Involution2d
from involution.cli.__main__ import main
from involution.export import (
    export_onnx,
    export_program,
    nonstandard_onnx_domains,
    onnx_max_abs_diff,
    program_max_abs_diff,
)

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that no branch is silenced by a zero gamma."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, 0, 0.1)
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _small_net() -> nn.Module:
    return _randomize_norms(
        nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            Involution2d(16, kernel_size=7, stride=2, group_channels=8),
            Involution2d(16, kernel_size=3, out_channels=32),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 5),
        )
    )


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return _small_net()


@pytest.fixture(scope="module")
def onnx_path(net, tmp_path_factory):
    return export_onnx(net, tmp_path_factory.mktemp("onnx") / "net.onnx", torch.randn(2, 3, 32, 32))


def test_onnx_has_standard_ops_dynamic_sizes_and_matches(net, onnx_path):
    path = onnx_path
    assert nonstandard_onnx_domains(path) == set()
    proto = onnx.load(str(path))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # B, C fixed, H, W
    inputs = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 45, 38), torch.randn(1, 3, 17, 23)]
    assert onnx_max_abs_diff(path, net, inputs) <= 1e-4


def test_onnx_check_fails_on_a_different_model(onnx_path):
    torch.manual_seed(1)
    other = _small_net()
    assert onnx_max_abs_diff(onnx_path, other, [torch.randn(2, 3, 32, 32)]) > 1e-3


def test_nonstandard_domains_are_found(tmp_path):
    from onnx import helper

    node = helper.make_node("Custom", ["x"], ["y"], domain="involution")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("involution", 1)]
    )
    onnx.save(model, tmp_path / "custom.onnx")
    assert nonstandard_onnx_domains(tmp_path / "custom.onnx") == {"involution"}


def test_exported_program_has_no_custom_op_and_matches(net, tmp_path):
    path = tmp_path / "net.pt2"
    program = export_program(net, path, torch.randn(2, 3, 32, 32))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("involution" in t for t in targets), targets
    inputs = [torch.randn(2, 3, 32, 32), torch.randn(1, 3, 41, 29)]
    assert program_max_abs_diff(path, net, inputs) <= 1e-5


def test_export_rejects_non_image_example(net, tmp_path):
    with pytest.raises(ValueError, match="example input"):
        export_program(net, tmp_path / "x.pt2", torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="at least one"):
        program_max_abs_diff(tmp_path / "x.pt2", net, [])


# The command line, on a tiny registered model (a zoo model takes minutes to export to ONNX).


@pytest.fixture
def tiny(monkeypatch) -> str:
    from tiny_model import register_tiny_model

    return register_tiny_model(monkeypatch)


def _reported_diff(stdout: str) -> float:
    line = next(line for line in stdout.splitlines() if line.startswith("max abs diff"))
    return float(line.rsplit(":", 1)[1])


def test_cli_export_onnx(tiny, tmp_path, capsys):
    path = tmp_path / "tiny.onnx"
    assert main(["export", "--model", tiny, "--image-size", "32", "--output", str(path)]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime" in out and "2x3x32x32, 3x3x40x36" in out
    assert 0 <= _reported_diff(out) <= 1e-4
    assert nonstandard_onnx_domains(path) == set()


def test_cli_export_program_from_a_weights_file(tiny, tmp_path, capsys):
    from involution.models import create_model, save_weights

    weights = tmp_path / "tiny.safetensors"
    save_weights(create_model(tiny, num_classes=5), weights)
    path = tmp_path / "tiny.pt2"
    argv = ["export", "--weights", str(weights), "--format", "exported-program"]
    assert main([*argv, "--image-size", "24", "--output", str(path)]) == 0
    assert _reported_diff(capsys.readouterr().out) <= 1e-5
    program = torch.export.load(path).module()
    assert program(torch.randn(1, 3, 29, 31)).shape == (1, 5)


def test_cli_export_fails_above_atol(tiny, tmp_path, monkeypatch, capsys):
    from involution.cli import export as export_cli

    monkeypatch.setattr(export_cli, "program_max_abs_diff", lambda *args: 0.5)
    argv = ["export", "--model", tiny, "--format", "exported-program", "--image-size", "24"]
    assert main([*argv, "--output", str(tmp_path / "x.pt2")]) == 1
    assert "max abs diff 0.5 is above --atol 0.0001" in capsys.readouterr().err


def test_cli_export_bad_input(tiny, tmp_path, capsys):
    from involution.models import create_model, save_weights

    weights = tmp_path / "tiny.safetensors"
    save_weights(create_model(tiny, num_classes=5), weights)
    out = str(tmp_path / "x.onnx")
    cases = [
        (["--model", tiny, "--model-arg", "num_classes=7", "--weights", str(weights)], "9.weight: checkpoint (5, 16) vs model (7, 16)"),
        (["--model", "rednet26", "--weights", str(weights)], f"holds a {tiny} model, not --model rednet26"),
        (["--model", "rednet2"], "not a registered model"),
        (["--model", tiny, "--weights", str(tmp_path / "none.safetensors")], "is not a file"),
        ([], "give --model NAME"),
        (["--model", tiny, "--model-arg", "width"], "must be KEY=VALUE"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(["export", *argv, "--output", out]) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", tiny, "--format", "tflite"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_export_zoo_model_to_onnx(tmp_path, capsys):
    path = tmp_path / "rednet26.onnx"
    argv = ["export", "--model", "rednet26_cifar", "--model-arg", "base_width=16"]
    assert main([*argv, "--image-size", "32", "--output", str(path)]) == 0
    assert _reported_diff(capsys.readouterr().out) <= 1e-4
    assert nonstandard_onnx_domains(path) == set()

"""Export to ONNX and torch.export: standard operators, dynamic sizes, parity with PyTorch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from involution import Involution2d
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

"""Export to ONNX and torch.export: standard operators, a compact graph, dynamic sizes, parity."""

from __future__ import annotations

import ast
import collections
import copy
import logging
import math
import re
import warnings

import pytest
import torch
from torch import nn
from torch.export import Dim

from involution import Involution1d, Involution2d, Involution3d
from involution import export as export_module
from involution.cli.__main__ import main
from involution.export import (
    _exporter_output,
    export_onnx,
    export_program,
    nonstandard_onnx_domains,
    onnx_max_abs_diff,
    onnx_op_counts,
    program_max_abs_diff,
)
from involution.functional import fused_involution2d, involution2d
from involution.models import create_model
from involution.ops import export_graph

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _calibrate_norms(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """BatchNorm running statistics measured on ``images``, so that activations keep their scale
    through the layers (an involution multiplies its input by a kernel computed from it)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for batch in images.split(4):
            model(batch)
    return model.eval()


def _small_rednet() -> nn.Module:
    """A zoo RedNet at a quarter of its width: a 3x3 stem involution, strided 7x7 ones.

    Each block ends in a BatchNorm that the zoo initializes to zero, which would silence the
    block's involution; a small scale makes every involution count. (A stack of involutions is a
    polynomial of high degree in its input: at scale one, random inputs give outputs of 1e20.)
    """
    model = create_model("rednet26_cifar", base_width=16, num_classes=10)
    for name, module in model.named_modules():
        if name.endswith("bn3"):
            nn.init.uniform_(module.weight, 0.1, 0.3)
    return _calibrate_norms(model, torch.randn(8, 3, 32, 32))


def _averaging_kernels(model: nn.Module) -> nn.Module:
    """Scales each involution's kernel to average its taps rather than sum them: outputs of a
    stack of involutions with nothing between them then stay of order one."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Involution2d):
                taps = math.prod(module.kernel_size)
                module.span.weight.div_(taps)
                module.span.bias.div_(taps)
    return model


def _small_net() -> nn.Module:
    return _calibrate_norms(
        nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            Involution2d(16, kernel_size=7, stride=2, group_channels=8),
            Involution2d(16, kernel_size=3, out_channels=32),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 5),
        ),
        torch.randn(8, 3, 32, 32),
    )


@pytest.fixture(scope="module")
def rednet() -> nn.Module:
    torch.manual_seed(0)
    return _small_rednet()


@pytest.fixture(scope="module")
def rednet_onnx(rednet, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "rednet.onnx"
    return export_onnx(rednet, path, torch.randn(2, 3, 32, 32))


def test_onnx_rednet_has_standard_ops_dynamic_sizes_and_matches(rednet, rednet_onnx):
    path = rednet_onnx
    assert nonstandard_onnx_domains(path) == set()
    proto = onnx.load(str(path))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]  # B, C fixed, H, W
    # Two batch sizes, two spatial sizes, and odd sizes that strided layers round up.
    sizes = [(2, 32, 32), (1, 32, 32), (3, 48, 40), (1, 37, 29)]
    inputs = [torch.randn(b, 3, h, w) for b, h, w in sizes]
    assert onnx_max_abs_diff(path, rednet, inputs) <= 1e-4


def test_onnx_check_fails_on_a_different_model(rednet_onnx):
    torch.manual_seed(1)
    other = _small_rednet()
    assert onnx_max_abs_diff(rednet_onnx, other, [torch.randn(2, 3, 32, 32)]) > 1e-3


def _ops_of_layer(path, name: str) -> collections.Counter[str]:
    """Operator types of the nodes the exporter attributes to the top-level module ``name``."""
    counts: collections.Counter[str] = collections.Counter()
    for node in onnx.load(str(path)).graph.node:
        scopes = {p.key: p.value for p in node.metadata_props}["pkg.torch.onnx.name_scopes"]
        if ast.literal_eval(scopes)[1:2] == [name]:
            counts[node.op_type] += 1
    return counts


# The nodes that compute a layer's neighbourhood index and output shape from the input's shape.
_INDEX_OPS = {"Shape", "ReduceProd", "Range", "Reshape", "Slice", "GatherND", "Add", "Concat"}


def test_onnx_layer_is_ten_nodes_whatever_the_kernel_size(tmp_path):
    layers = [Involution2d(16, k, group_channels=8) for k in (7, 7, 3, 3)]
    net = _calibrate_norms(_averaging_kernels(nn.Sequential(*layers)), torch.randn(8, 16, 12, 12))
    path = export_onnx(net, tmp_path / "layers.onnx", torch.randn(2, 16, 12, 12))
    assert onnx_max_abs_diff(path, net, [torch.randn(1, 16, 9, 13)]) <= 1e-4
    # Layers 1 and 3 repeat the geometry and size of the layer before them, and share its index
    # and output shape: their nodes are what each further layer costs.
    seven, three = _ops_of_layer(path, "1"), _ops_of_layer(path, "3")
    assert seven == three, (seven, three)
    assert set(seven) == {"Conv", "Relu", "Pad", "Reshape", "Transpose", "Gather", "MatMul"}
    assert sum(seven.values()) - seven["Conv"] <= 10, seven
    # The first layer of a geometry adds the nodes that build them, a handful more.
    for name, shared in (("0", seven), ("2", three)):
        extra = _ops_of_layer(path, name) - shared
        assert set(extra) <= _INDEX_OPS and sum(extra.values()) <= 9, extra


class _GeneratedKernelLayer(nn.Module):
    """An involution whose kernel a 1x1 "span" convolution generates from hidden features:
    through :func:`involution.functional.fused_involution2d`, or composed by hand."""

    def __init__(self, channels: int, kernel_size: int, stride: int, groups: int, fused: bool):
        super().__init__()
        self.kernel_size, self.stride, self.groups, self.fused = kernel_size, stride, groups, fused
        self.reduce = nn.Conv2d(channels, channels // 4, 1, stride=stride)
        self.span = nn.Conv2d(channels // 4, groups * kernel_size**2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.reduce(x))
        k, s = self.kernel_size, self.stride
        if self.fused:
            return fused_involution2d(x, features, self.span.weight, self.span.bias, k, s)
        kernel = self.span(features).unflatten(1, (self.groups, k * k))
        return involution2d(x, kernel, k, s)


def test_onnx_fused_op_exports_as_the_compact_graph(tmp_path):
    torch.manual_seed(0)
    composed = nn.Sequential(
        _GeneratedKernelLayer(16, 7, 2, 2, fused=False),
        _GeneratedKernelLayer(16, 3, 1, 4, fused=False),
    ).eval()
    fused = copy.deepcopy(composed)
    for layer in fused:
        layer.fused = True
    example = torch.randn(2, 16, 19, 17)
    path = export_onnx(fused, tmp_path / "fused.onnx", example)
    counts = onnx_op_counts(path)
    composed_counts = onnx_op_counts(export_onnx(composed, tmp_path / "composed.onnx", example))
    # The same graph, less the nodes that reshape the composed layers' kernels.
    assert not counts - composed_counts, counts - composed_counts
    assert counts["Gather"] == composed_counts["Gather"] == 2
    assert counts["MatMul"] == composed_counts["MatMul"] == 2
    assert nonstandard_onnx_domains(path) == set()
    inputs = [torch.randn(2, 16, 19, 17), torch.randn(1, 16, 24, 13)]
    assert onnx_max_abs_diff(path, fused, inputs) <= 1e-4
    program = export_program(fused, tmp_path / "fused.pt2", example)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("involution" in t for t in targets), targets
    assert {"aten.index_select.default", "aten.matmul.default"} <= targets
    assert program_max_abs_diff(tmp_path / "fused.pt2", fused, inputs) <= 1e-4


def test_onnx_exporter_called_directly_traces_standard_ops(tmp_path):
    # Without export_onnx's translation table the ONNX exporter gets the ATen form.
    net = _small_net()
    path = tmp_path / "direct.onnx"
    dims = {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}
    with _exporter_output(verbose=False):
        torch.onnx.export(
            net,
            (torch.randn(2, 3, 32, 32),),
            str(path),
            input_names=["images"],
            output_names=["output"],
            dynamic_shapes=(dims,),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    assert nonstandard_onnx_domains(path) == set()
    assert onnx_op_counts(path)["MatMul"] == 2
    assert onnx_max_abs_diff(path, net, [torch.randn(1, 3, 41, 29)]) <= 1e-4


@pytest.mark.parametrize("module", [Involution1d, Involution3d])
def test_onnx_translation_of_other_dimensions(module, tmp_path):
    torch.manual_seed(0)
    n = 1 if module is Involution1d else 3
    net = _averaging_kernels(
        nn.Sequential(module(8, 3, stride=2, group_channels=4), module(8, 3, group_channels=4))
    ).eval()
    path = tmp_path / f"involution{n}d.onnx"
    dims = {0: Dim.DYNAMIC, **{2 + i: Dim.DYNAMIC for i in range(n)}}
    with _exporter_output(verbose=False), export_graph.onnx_translation() as translation:
        torch.onnx.export(
            net,
            (torch.randn(2, 8, *[7] * n),),
            str(path),
            input_names=["images"],
            output_names=["output"],
            dynamic_shapes=(dims,),
            dynamo=True,
            external_data=False,
            custom_translation_table=translation,
            verbose=False,
        )
    assert nonstandard_onnx_domains(path) == set()
    inputs = [torch.randn(2, 8, *[7] * n), torch.randn(1, 8, *range(9, 9 - n, -1))]
    assert onnx_max_abs_diff(path, net, inputs) <= 1e-4


def test_traced_form_says_how_involution_is_traced():
    seen = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(export_graph.traced_form())
            return x * 2

    Probe()(torch.randn(2, 3))
    torch.export.export(Probe(), (torch.randn(2, 3),))
    with export_graph.onnx_translation():
        assert export_graph.traced_form() is None  # nothing is tracing
        torch.export.export(Probe(), (torch.randn(2, 3),))
    torch.export.export(Probe(), (torch.randn(2, 3),))
    # Compiled, not exported (torch before 2.13 traces is_exporting() as True under compile).
    torch.compile(Probe(), fullgraph=True, backend="eager")(torch.randn(2, 3))
    assert seen == [None, "aten", "onnx", "aten", None]


def test_onnx_float16_model(tmp_path):
    net = _calibrate_norms(
        _averaging_kernels(
            nn.Sequential(
                Involution2d(16, kernel_size=7, stride=2, group_channels=8),
                Involution2d(16, kernel_size=3, group_channels=8),
            )
        ),
        torch.randn(8, 16, 19, 17),
    )
    half = copy.deepcopy(net).half()
    path = export_onnx(half, tmp_path / "half.onnx", torch.randn(2, 16, 19, 17).half())
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    inputs = [torch.randn(2, 16, 19, 17).half(), torch.randn(1, 16, 24, 14).half()]
    assert onnx_max_abs_diff(path, half, inputs) <= 1e-2


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


def test_exported_program_has_no_custom_op_and_matches(tmp_path):
    net = _small_net()
    path = tmp_path / "net.pt2"
    # An example batch of 1 still gives a program of any batch size.
    program = export_program(net, path, torch.randn(1, 3, 32, 32))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("involution" in t for t in targets), targets
    assert {"aten.index_select.default", "aten.matmul.default"} <= targets
    inputs = [torch.randn(2, 3, 32, 32), torch.randn(1, 3, 41, 29)]
    assert program_max_abs_diff(path, net, inputs) <= 1e-5


def test_export_rejects_non_image_example(tmp_path):
    net = _small_net()
    with pytest.raises(ValueError, match="example input"):
        export_program(net, tmp_path / "x.pt2", torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="at least one"):
        program_max_abs_diff(tmp_path / "x.pt2", net, [])


def test_exporter_output_is_hidden_unless_verbose(caplog):
    caplog.set_level(logging.INFO)
    optimizer = logging.getLogger("onnx_ir.passes.common")
    before = optimizer.level
    for verbose in (False, True):
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with _exporter_output(verbose):
                optimizer.info("replaced an initializer")
                logging.getLogger("onnxscript.optimizer").warning("an optional package is missing")
                warnings.warn("a deprecation inside the exporter", FutureWarning, stacklevel=1)
        assert len(caplog.records) == (2 if verbose else 0), caplog.records
        assert len(caught) == (1 if verbose else 0), caught
        assert optimizer.level == before


# The command line, on a tiny registered model (the zoo RedNet above is tested through the library).


@pytest.fixture
def tiny(monkeypatch) -> str:
    from tiny_model import register_tiny_model

    return register_tiny_model(monkeypatch)


def _reported_diff(stdout: str) -> float:
    line = next(line for line in stdout.splitlines() if "max abs diff" in line)
    return float(re.search(r"max abs diff (\S+) on", line).group(1))


def test_cli_export_onnx_prints_one_line_per_stage_and_nothing_else(tiny, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)  # as the command line sets it; the exporters log at INFO
    path = tmp_path / "tiny.onnx"
    assert main(["export", "--model", tiny, "--image-size", "32", "--output", str(path)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split(" ...")[0] for line in lines] == [
        f"building {tiny}",
        f"exporting to {path} (ONNX opset 18)",
        "checking with onnxruntime against PyTorch",
    ]
    assert all(re.search(r" \.\.\. \d+\.\d s", line) for line in lines), lines
    assert f"{sum(onnx_op_counts(path).values())} nodes" in lines[1]
    assert "on inputs 2x3x32x32, 3x3x25x29" in lines[2]
    assert 0 <= _reported_diff(out) <= 1e-4
    assert err == ""
    assert [r for r in caplog.records if not r.name.startswith("involution")] == []
    assert nonstandard_onnx_domains(path) == set()


def test_cli_export_traces_at_the_models_own_image_size(tiny, tmp_path, capsys, monkeypatch):
    """Without --image-size, a model that gives its image size is traced and checked at it; one
    that does not, at 224."""
    from involution.models import _registry

    builder = _registry._MODELS[tiny]

    def with_image_size(**kwargs):
        net = builder(**kwargs)
        net.image_size = 24
        return net

    argv = ["export", "--model", tiny, "--format", "exported-program"]
    monkeypatch.setitem(_registry._MODELS, tiny, with_image_size)
    assert main([*argv, "--output", str(tmp_path / "a.pt2")]) == 0
    assert "on inputs 2x3x24x24, 3x3x19x22" in capsys.readouterr().out
    monkeypatch.setitem(_registry._MODELS, tiny, builder)
    assert main([*argv, "--output", str(tmp_path / "b.pt2")]) == 0
    assert "on inputs 2x3x224x224, 3x3x169x197" in capsys.readouterr().out


def test_cli_export_program_from_a_weights_file(tiny, tmp_path, capsys):
    from involution.models import save_weights

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
    from involution.models import save_weights

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
        (["--model", tiny, "--image-size", "0"], "--image-size (0) and --batch-size (2) must be >= 1"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(["export", *argv, "--output", out]) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", tiny, "--format", "tflite"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def _random_norm(channels: int) -> nn.BatchNorm2d:
    """A BatchNorm in eval mode with statistics and affine parameters away from 0 and 1."""
    norm = nn.BatchNorm2d(channels)
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    return norm.eval()


class _ConvNorm(nn.Module):
    """A convolution and a BatchNorm, each called once; subclasses say how."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = _random_norm(4)


class _Residual(_ConvNorm):
    """A convolution whose output feeds its BatchNorm and the sum after it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.norm(y) + y


class _Shared(nn.Module):
    """One convolution called twice, each time followed by a BatchNorm of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.first, self.second = _random_norm(4), _random_norm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.conv(torch.relu(self.first(self.conv(x)))))


def test_batch_norms_fold_into_the_convolutions_they_follow_in_a_copy():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), _random_norm(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=4, bias=False), _random_norm(8),
    ).eval()  # fmt: skip
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 9, 10)
    folded = export_module._fold_batch_norms(model, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    other = torch.randn(3, 3, 7, 6)  # not the input the fold was checked on
    torch.testing.assert_close(folded(other), model(other), rtol=1e-5, atol=1e-5)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2  # left as it was
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


class _Unused(_ConvNorm):
    """The convolution's output is used again after its BatchNorm, to no effect on the
    example (whose values stay below 100): only the count of its uses tells."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.norm(y) + torch.relu(y - 100)


class _InPlace(_ConvNorm):
    """The convolution's output is changed in place before its BatchNorm, to no effect on the
    example."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).clamp_(min=-100))


class _Pair(nn.Module):
    """Returns two tensors; the BatchNorm is called with its input as a keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.norm = _random_norm(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.norm(input=self.conv(x)), x


@pytest.mark.parametrize("module", [_Residual, _Shared, _Unused, _InPlace, _Pair])
def test_batch_norms_stay_where_folding_would_change_the_model(module):
    torch.manual_seed(0)
    model = module().eval()
    assert export_module._fold_batch_norms(model, torch.randn(2, 4, 6, 6)) is model


def test_a_model_in_training_mode_is_left_alone():
    norm = _random_norm(4).train()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), norm)
    statistics = norm.running_mean.clone()
    assert export_module._fold_batch_norms(model, torch.randn(2, 3, 5, 5)) is model
    assert torch.equal(norm.running_mean, statistics)  # no forward ran

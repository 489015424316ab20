"""Involution layers: kernel generation, shapes, seed signature, authors' parity, errors, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from involution import (
    Involution,
    Involution1d,
    Involution2d,
    Involution3d,
    convert_official_state_dict,
    functional,
)

from conftest import assert_close_for

GOLDEN = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "reference"
    / ("official_involution_golden.safetensors")
)
GOLDEN_CASES = {  # name -> (channels, kernel_size, stride)
    "c64_k7_s1": (64, 7, 1),
    "c64_k7_s2": (64, 7, 2),
    "c32_k3_s1": (32, 3, 1),
    "c128_k5_s1": (128, 5, 1),
}


def test_seed_signature():
    layer = Involution(in_channels=32, out_channels=64, kernel_size=3, stride=1, padding=1)
    assert layer(torch.randn(1, 32, 64, 64)).shape == (1, 64, 64, 64)


def test_seed_defaults_match_nn_conv2d():
    # Involution(in_channels, out_channels, kernel_size, stride=1, padding=0), as nn.Conv2d.
    x = torch.randn(1, 64, 16, 16)
    assert Involution(64, 64, 3)(x).shape == nn.Conv2d(64, 64, 3)(x).shape == (1, 64, 14, 14)
    assert Involution(64, 32, 3, 2)(x).shape == (1, 32, 7, 7)
    with pytest.raises(TypeError, match="kernel_size"):
        Involution(64, 64)  # type: ignore[call-arg]
    # Involution2d keeps "same" padding.
    assert Involution2d(64, 3)(x).shape == (1, 64, 16, 16)


@pytest.mark.parametrize(
    ("padding", "expected"), [("same", (15, 10)), ("valid", (11, 6)), (None, (15, 10))]
)
def test_padding_modes_in_layers_and_functional(padding, expected):
    layer = Involution2d(16, kernel_size=5, padding=padding)
    x = torch.randn(1, 16, 15, 10)
    assert layer(x).shape == (1, 16, *expected)
    assert Involution(16, 16, 5, padding=padding)(x).shape == (1, 16, *expected)
    kernel = torch.randn(1, 1, 25, *expected)
    explicit = 0 if padding == "valid" else 2
    torch.testing.assert_close(
        functional.involution2d(x, kernel, 5, padding=padding),
        functional.involution2d(x, kernel, 5, padding=explicit),
    )
    assert Involution1d(16, 3, padding=padding)(torch.randn(1, 16, 9)).shape[-1] in (7, 9)
    assert Involution3d(16, 3, padding=padding)(torch.randn(1, 16, 5, 5, 5)).shape[-1] in (3, 5)


def test_same_padding_with_an_even_kernel_needs_an_even_dilation():
    assert Involution2d(16, 4, dilation=2, padding="same")(torch.randn(1, 16, 9, 9)).shape[-1] == 9
    with pytest.raises(ValueError, match=r"cannot have 'same' padding"):
        Involution2d(16, 4, padding="same")
    with pytest.raises(ValueError, match=r"padding \('full'\) must be an int, a tuple"):
        Involution2d(16, 3, padding="full")


def _generator(layer, pixels):
    """The layer's kernel generator applied to (B, C, Ho, Wo) pixel features."""
    kernel = layer.span(layer.act(layer.norm(layer.reduce(pixels))))
    return kernel.view(pixels.shape[0], layer.groups, -1, *pixels.shape[2:])


def test_kernels_come_from_the_window_centre_without_padding():
    layer = Involution2d(16, kernel_size=3, padding=0, group_channels=8).eval()
    x = torch.randn(2, 16, 6, 7)
    # Output (i, j) covers input rows i..i+2 and columns j..j+2: its centre is (i + 1, j + 1).
    expected = _generator(layer, x[:, :, 1:5, 1:6])
    torch.testing.assert_close(layer.generate_kernel(x), expected)
    torch.testing.assert_close(
        layer.generate_kernel(x)[..., 0, 0], _generator(layer, x[:, :, 1:2, 1:2])[..., 0, 0]
    )


def test_kernels_come_from_the_window_centre_with_a_stride():
    layer = Involution2d(16, kernel_size=3, stride=2, padding=0, group_channels=8).eval()
    x = torch.randn(2, 16, 8, 7)
    # Output i's window starts at 2i and is centred on 2i + 1: the stride block 2i+1..2i+2.
    rows = []
    for i in range(3):
        row = [x[:, :, 2 * i + 1 : 2 * i + 3, 2 * j + 1 : 2 * j + 3].mean((2, 3)) for j in range(3)]
        rows.append(torch.stack(row, dim=-1))
    torch.testing.assert_close(layer.generate_kernel(x), _generator(layer, torch.stack(rows, -2)))


def test_kernels_of_windows_centred_in_the_padding_see_zeros():
    layer = Involution1d(16, kernel_size=3, padding=2, group_channels=8).eval()
    layer.norm.running_mean.normal_()  # so that zero input does not give zero features
    x = torch.randn(2, 16, 5)
    # 7 outputs: output i is centred on input i - 1; outputs 0 and 6 on the zero padding.
    expected = _generator(layer, torch.nn.functional.pad(x, (1, 1)))
    torch.testing.assert_close(layer.generate_kernel(x), expected)
    # With a stride, only the in-image pixels of a block are averaged.
    strided = Involution1d(16, kernel_size=3, stride=2, padding=2, group_channels=8).eval()
    strided.norm.running_mean.normal_()
    blocks = [x[..., 0], x[..., 1:3].mean(-1), x[..., 3:5].mean(-1), torch.zeros(2, 16)]
    expected = _generator(strided, torch.stack(blocks, dim=-1))
    torch.testing.assert_close(strided.generate_kernel(x), expected)


def test_even_kernel_centre_rounds_down():
    layer = Involution2d(16, kernel_size=4, padding=1, group_channels=8).eval()
    x = torch.randn(1, 16, 6, 6)
    # The window of output i is i-1..i+2; its centre, i + 0.5, rounds down to i.
    torch.testing.assert_close(layer.generate_kernel(x), _generator(layer, x[:, :, :5, :5]))


def test_kernel_features_are_what_span_makes_the_kernel_from():
    layer = Involution2d(32, kernel_size=3, stride=2, padding=0).eval()
    x = torch.randn(2, 32, 9, 8)
    features = layer.kernel_features(x)
    assert features.shape == (2, 8, 4, 3)
    torch.testing.assert_close(layer.generate_kernel(x), layer.span(features).view(2, 2, 9, 4, 3))


@pytest.mark.parametrize(
    ("cls", "size", "stride", "expected"),
    [
        (Involution1d, (15,), 2, (8,)),
        (Involution2d, (15, 9), 2, (8, 5)),
        (Involution2d, (7, 7), 3, (3, 3)),
        (Involution3d, (5, 4, 3), 2, (3, 2, 2)),
    ],
)
def test_output_shape_odd_sizes(cls, size, stride, expected):
    layer = cls(32, kernel_size=3, stride=stride)
    x = torch.randn(2, 32, *size)
    assert layer(x).shape == (2, 32, *expected)
    assert layer.generate_kernel(x).shape == (2, 2, 3 ** len(size), *expected)


def test_generated_kernel_is_bottleneck_of_window_means_on_odd_sizes():
    layer = Involution2d(16, kernel_size=3, stride=2, group_channels=8).eval()
    x = torch.randn(2, 16, 7, 5)
    # Manual ceil-mode pooling: the mean of each 2x2 window, clipped at the border.
    pooled = torch.stack(
        [
            torch.stack(
                [x[:, :, i : i + 2, j : j + 2].mean(dim=(2, 3)) for j in range(0, 5, 2)], dim=-1
            )
            for i in range(0, 7, 2)
        ],
        dim=-2,
    )
    expected = layer.span(layer.act(layer.norm(layer.reduce(pooled))))
    torch.testing.assert_close(layer.generate_kernel(x), expected.view(2, 2, 9, 4, 3))


def test_forward_is_functional_of_generated_kernel():
    layer = Involution2d(32, kernel_size=5, stride=2, dilation=2, out_channels=48).double()
    x = torch.randn(2, 32, 11, 10, dtype=torch.float64)
    kernel = layer.generate_kernel(x)
    inner = functional.involution2d(x, kernel, 5, 2, None, 2, backend="reference")
    assert_close_for(torch.float64, layer(x), layer.proj(inner))


def test_parameters_receive_gradients_and_reset():
    layer = Involution2d(32, kernel_size=3)
    layer(torch.randn(2, 32, 8, 8)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    before = layer.span.weight.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.span.weight)


def test_device_dtype_and_extra_repr():
    layer = Involution2d(32, kernel_size=3, stride=2, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    text = repr(layer)
    assert "kernel_size=(3, 3)" in text and "stride=(2, 2)" in text and "groups=2" in text
    assert "padding" not in layer.extra_repr() and "dilation" not in layer.extra_repr()


def test_norm_and_activation_choices():
    layer = Involution2d(
        32, kernel_size=3, norm_layer=lambda c: nn.GroupNorm(2, c), act_layer=nn.GELU
    )
    assert isinstance(layer.norm, nn.GroupNorm) and isinstance(layer.act, nn.GELU)
    assert layer(torch.randn(1, 32, 6, 6)).shape == (1, 32, 6, 6)


def test_channels_last_and_batch_zero():
    layer = Involution2d(32, kernel_size=3, stride=2).eval()
    x = torch.randn(2, 32, 9, 9)
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), layer(x))
    assert layer(torch.randn(0, 32, 9, 9)).shape == (0, 32, 5, 5)


@pytest.mark.skipif(not GOLDEN.exists(), reason=f"golden file not found at {GOLDEN}")
@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_matches_authors_module(case):
    from safetensors.torch import load_file

    tensors = load_file(GOLDEN)
    channels, kernel_size, stride = GOLDEN_CASES[case]
    prefix = f"{case}/state/"
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    layer = Involution2d(channels, kernel_size=kernel_size, stride=stride)
    layer.load_state_dict(convert_official_state_dict(state), strict=True)
    layer.eval()
    with torch.no_grad():
        out = layer(tensors[f"{case}/input"])
    torch.testing.assert_close(out, tensors[f"{case}/output"], rtol=1e-5, atol=1e-5)


def test_convert_official_state_dict_rejects_unknown_keys():
    with pytest.raises(KeyError, match=r"conv3\.weight"):
        convert_official_state_dict({"conv3.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"channels": 30},
            ValueError,
            r"channels \(30\) must be divisible by group_channels \(16\)",
        ),
        ({"channels": 16, "reduction_ratio": 32}, ValueError, r"channels // reduction_ratio"),
        ({"kernel_size": 0}, ValueError, r"kernel_size \(0\) must be >= 1"),
        ({"kernel_size": 4}, ValueError, r"kernel_size \(4\) .* cannot have 'same' padding"),
        ({"stride": 0}, ValueError, r"stride \(0\) must be >= 1"),
        ({"dilation": -1}, ValueError, r"dilation \(-1\) must be >= 1"),
        ({"padding": -2}, ValueError, r"padding \(-2\) must be >= 0"),
        ({"kernel_size": 2.5}, TypeError, r"kernel_size \(2.5\) must be an int"),
        (
            {"stride": (1, 2, 3)},
            TypeError,
            r"stride \(\(1, 2, 3\)\) must be an int or a tuple of 2",
        ),
        ({"out_channels": 0}, ValueError, r"out_channels \(0\) must be a positive int"),
        ({"out_channels": True}, TypeError, r"out_channels \(True\) must be an int, got bool"),
        ({"channels": 32.0}, TypeError, r"channels \(32.0\) must be an int, got float"),
        ({"group_channels": False}, TypeError, r"group_channels \(False\) must be an int"),
        ({"reduction_ratio": 2.5}, TypeError, r"reduction_ratio \(2.5\) must be an int"),
        ({"kernel_size": True}, TypeError, r"kernel_size \(True\) must be an int"),
        ({"stride": (1, True)}, TypeError, r"stride \(\(1, True\)\) must be an int"),
        ({"padding": 1.0}, TypeError, r"padding \(1.0\) must be an int"),
        ({"backend": "bogus"}, ValueError, r"backend \('bogus'\) must be 'auto' or one of"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    kwargs = {"channels": 32, **kwargs}
    with pytest.raises(error, match=match):
        Involution2d(**kwargs)


def test_seed_class_rejects_a_bool_size():
    with pytest.raises(TypeError, match=r"out_channels \(True\) must be an int, got bool"):
        Involution(64, True, 3)


def test_numpy_integers_are_sizes():
    np = pytest.importorskip("numpy")
    layer = Involution2d(
        np.int64(32), kernel_size=np.int32(3), stride=np.int64(2), padding=np.int16(1),
        group_channels=np.int64(16), reduction_ratio=np.int64(4), out_channels=np.int64(48),
    )  # fmt: skip
    assert layer(torch.randn(1, 32, 8, 8)).shape == (1, 48, 4, 4)
    assert type(layer.channels) is int and layer.kernel_size == (3, 3)
    assert type(layer.kernel_size[0]) is int and type(layer.out_channels) is int


def test_module_input_errors():
    layer = Involution2d(32, kernel_size=3)
    with pytest.raises(ValueError, match=r"input must have 4 dimensions .* got shape \(32, 8, 8\)"):
        layer(torch.randn(32, 8, 8))
    with pytest.raises(
        ValueError, match=r"input channels \(16\) must equal the module's channels \(32\)"
    ):
        layer(torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match=r"output size .* must be positive"):
        Involution2d(32, kernel_size=5, padding=0)(torch.randn(1, 32, 3, 3))


def test_functional_errors():
    x = torch.randn(2, 8, 6, 6)
    w = torch.randn(2, 2, 9, 6, 6)
    f = functional.involution2d
    with pytest.raises(ValueError, match=r"kernel shape \(2, 2, 9, 6, 5\) does not fit"):
        f(x, w[..., :5], 3)
    with pytest.raises(ValueError, match=r"kernel shape \(2, 3, 9, 6, 6\) does not fit"):
        f(x, torch.randn(2, 3, 9, 6, 6), 3)
    # The message names what is wrong, not an "expected" shape equal to the given one.
    with pytest.raises(ValueError, match=r"its groups \(dimension 1: 3\) must divide the 32"):
        f(torch.randn(2, 32, 6, 6), torch.randn(2, 3, 9, 6, 6), 3)
    with pytest.raises(ValueError, match=r"kernel shape \(1, 2, 9, 6, 6\) does not fit"):
        f(x, w[:1], 3)
    with pytest.raises(ValueError, match=r"kernel must have 5 dimensions"):
        f(x, w[0], 3)
    with pytest.raises(TypeError, match=r"kernel dtype \(torch.float64\) must match input dtype"):
        f(x, w.double(), 3)
    with pytest.raises(ValueError, match=r"kernel device \(meta\) must match input device \(cpu\)"):
        f(x, w.to("meta"), 3)
    with pytest.raises(TypeError, match=r"input dtype \(torch.int64\) must be a floating-point"):
        f(x.long(), w.long(), 3)
    with pytest.raises(ValueError, match=r"backend \('cuda'\) must be 'auto' or one of"):
        f(x, w, 3, backend="cuda")
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor, got list"):
        f([1.0], w, 3)
    with pytest.raises(TypeError, match=r"kernel_size \(True\) must be an int"):
        f(x, w, True)
    with pytest.raises(TypeError, match=r"stride \(1.0\) must be an int"):
        f(x, w, 3, stride=1.0)


def test_exported_onnx_has_standard_ops_and_matches(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    layer = Involution2d(32, kernel_size=3, stride=2).eval()
    x = torch.randn(2, 32, 10, 9)
    path = tmp_path / "involution.onnx"
    batch, height, width = (torch.export.Dim(n, min=1, max=64) for n in ("batch", "h", "w"))
    torch.onnx.export(
        layer,
        (x,),
        str(path),
        input_names=["x"],
        dynamic_shapes={"x": {0: batch, 2: height, 3: width}},
        dynamo=True,
    )
    model = onnx.load(str(path))
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 32, 10, 9), (3, 32, 13, 16)]:
        x = torch.randn(*shape)
        (got,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), layer(x), rtol=1e-4, atol=1e-4)


def test_pooling_matches_authors_avgpool_on_even_sizes():
    layer = Involution2d(16, kernel_size=3, stride=2).eval()
    x = torch.randn(1, 16, 8, 6)
    expected = layer.span(layer.act(layer.norm(layer.reduce(F.avg_pool2d(x, 2, 2)))))
    torch.testing.assert_close(layer.generate_kernel(x), expected.view(1, 1, 9, 4, 3))

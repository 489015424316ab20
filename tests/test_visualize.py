"""Kernel pictures: capture of the generated kernels, statistics, image loading, the PNG."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from involution import Involution2d
from involution.cli.__main__ import main
from involution.visualization import (
    capture_kernel,
    involution_layers,
    kernel_statistic,
    load_image,
    plot_kernels,
    sample_image,
)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        Involution2d(32, kernel_size=7, stride=2),
        nn.Sequential(nn.ReLU(), Involution2d(32, kernel_size=5)),
    )
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2)
    return net.eval()


def test_involution_layers_finds_nested_layers(net):
    assert list(involution_layers(net)) == ["3", "4.1"]
    assert involution_layers(nn.Sequential(nn.Conv2d(3, 3, 1))) == {}


def test_capture_kernel_is_the_layer_kernel_of_its_input(net):
    x = torch.randn(2, 3, 30, 26)
    kernel = capture_kernel(net, "4.1", x)
    with torch.no_grad():
        expected = net[4][1].generate_kernel(net[4][0](net[:4](x)))
    assert kernel.shape == (2, 2, 25, 8, 7)
    torch.testing.assert_close(kernel, expected)
    assert capture_kernel(net, "3", x).shape == (2, 2, 49, 8, 7)


def test_capture_kernel_rejects_a_layer_that_is_not_an_involution(net):
    with pytest.raises(KeyError, match=r"'1'.*valid layers: 3, 4\.1"):
        capture_kernel(net, "1", torch.randn(1, 3, 16, 16))


def test_kernel_statistics():
    kernel = torch.randn(1, 3, 9, 4, 5)
    torch.testing.assert_close(kernel_statistic(kernel), kernel.sum(2))
    torch.testing.assert_close(kernel_statistic(kernel, "max"), kernel.max(2).values)
    torch.testing.assert_close(kernel_statistic(kernel, "norm"), kernel.pow(2).sum(2).sqrt())
    assert kernel_statistic(kernel, "std").shape == (1, 3, 4, 5)
    with pytest.raises(ValueError, match="statistic"):
        kernel_statistic(kernel, "median")


def test_sample_image_ships_with_the_package():
    path = sample_image()
    assert path.is_file() and path.stat().st_size < 100_000
    images, picture = load_image(path, 64)
    assert images.shape == (1, 3, 64, 64) and picture.shape == (64, 64, 3)
    assert picture.min() >= 0 and picture.max() <= 1 and picture.std() > 0.05


def test_load_image_resizes_crops_and_normalizes(tmp_path):
    from PIL import Image

    # Left half black, right half white, 2:1 wide: the center crop keeps both halves.
    pixels = torch.zeros(20, 40, 3, dtype=torch.uint8)
    pixels[:, 20:] = 255
    Image.fromarray(pixels.numpy()).save(tmp_path / "wide.png")
    images, picture = load_image(tmp_path / "wide.png", 10)
    assert images.shape == (1, 3, 10, 10)
    assert picture[:, 0].max() < 0.1 and picture[:, -1].min() > 0.9
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(images[0, :, 0, -1], (1 - mean) / std)
    gray, _ = load_image(tmp_path / "wide.png", 10, channels=1)
    assert gray.shape == (1, 1, 10, 10)
    torch.testing.assert_close(gray[0, 0, 0, 0], torch.tensor(-1.0))


def test_load_image_bad_input(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.png\) cannot be read as an image"):
        load_image(tmp_path / "notes.png", 32)
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg"):
        load_image(tmp_path / "missing.jpg", 32)
    with pytest.raises(ValueError, match="channels"):
        load_image(sample_image(), 32, channels=2)


def test_plot_kernels_writes_a_png(net, tmp_path):
    pytest.importorskip("matplotlib")
    images, picture = load_image(sample_image(), 48)
    kernel = capture_kernel(net, "3", images)
    path = plot_kernels(picture, kernel, 7, [(0, 0), (47, 20)], [0, 1], tmp_path / "k.png", "std")
    assert path.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match=r"pixel \(48, 0\)"):
        plot_kernels(picture, kernel, 7, [(48, 0)], [0], tmp_path / "x.png")
    with pytest.raises(ValueError, match="groups"):
        plot_kernels(picture, kernel, 7, [(1, 1)], [2], tmp_path / "x.png")
    with pytest.raises(ValueError, match="kernel shape"):
        plot_kernels(picture, kernel, 5, [(1, 1)], [0], tmp_path / "x.png")


# The command line.


@pytest.fixture
def tiny(monkeypatch) -> str:
    from tiny_model import register_tiny_model

    return register_tiny_model(monkeypatch)


def test_cli_visualize_sample_image(tiny, tmp_path, capsys):
    path = tmp_path / "kernels.png"
    argv = ["visualize", "--model", tiny, "--image-size", "40", "--output", str(path)]
    assert main([*argv, "--layer", "3", "--pixels", "0,0", "39,20", "--groups", "1"]) == 0
    captured = capsys.readouterr()
    assert "layer 3, kernel (1, 2, 25, 10, 10)" in captured.out
    assert "no --weights: the model is randomly initialized" in captured.err
    assert "kernels drawn are untrained" in captured.err
    assert path.read_bytes()[:8] == PNG


def test_cli_visualize_with_weights_does_not_warn(tiny, tmp_path, capsys):
    from involution.models import create_model, save_weights

    save_weights(create_model(tiny), tmp_path / "w.safetensors")
    argv = ["visualize", "--weights", str(tmp_path / "w.safetensors"), "--image-size", "32"]
    assert main([*argv, "--output", str(tmp_path / "k.png")]) == 0
    assert "untrained" not in capsys.readouterr().err


def test_plot_kernels_draws_a_colour_scale_for_every_map(net, tmp_path, monkeypatch):
    matplotlib_figure = pytest.importorskip("matplotlib.figure")
    bars = []
    colorbar = matplotlib_figure.Figure.colorbar

    def record(self, mappable, *args, **kwargs):
        bars.append(mappable)
        return colorbar(self, mappable, *args, **kwargs)

    monkeypatch.setattr(matplotlib_figure.Figure, "colorbar", record)
    images, picture = load_image(sample_image(), 48)
    kernel = capture_kernel(net, "3", images)
    plot_kernels(picture, kernel, 7, [(0, 0), (47, 20), (9, 9)], [0, 1], tmp_path / "k.png")
    # One per statistic map (2 groups), one per pixel row of kernels (3 pixels).
    assert len(bars) == 5
    limits = [bar.get_clim() for bar in bars[2:]]
    assert all(low == -high and high > 0 for low, high in limits)  # symmetric: white is 0


def test_cli_visualize_zoo_model_and_list_layers(tmp_path, capsys):
    argv = ["visualize", "--model", "rednet26", "--model-arg", "base_width=16"]
    assert main([*argv, "--list-layers"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) > 5 and all("Involution2d(" in line for line in listed)
    image = tmp_path / "photo.jpg"
    from PIL import Image

    Image.open(sample_image()).resize((90, 60)).save(image)
    path = tmp_path / "k.png"
    assert main([*argv, "--image", str(image), "--image-size", "64", "--output", str(path)]) == 0
    last = listed[-1].split(":")[0]
    assert f"layer {last}," in capsys.readouterr().out
    assert path.read_bytes()[:8] == PNG


def test_cli_visualize_bad_input(tiny, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not an image")
    base = ["visualize", "--model", tiny, "--image-size", "32", "--output", str(tmp_path / "k.png")]
    cases = [
        (["--layer", "0"], "layer ('0') is not an involution layer of Sequential; valid layers: 3, 6"),
        (["--image", str(tmp_path / "notes.png")], "cannot be read as an image"),
        (["--image", str(tmp_path / "missing.png")], "missing.png) is not a file"),
        (["--pixels", "32,0"], "pixel (32, 0) must lie in the 32x32 image"),
        (["--groups", "2"], "groups ([2]) must be among 0..1"),
        (["--model-arg", "base_width=12"], "must be divisible by group_channels"),
        (["--image-size", "0"], "--image-size (0) must be >= 1"),
        (["--model-arg", "depth=3"], f"'depth' is not an argument of {tiny}; it takes base_width"),
        (["--model", "tiny_net"], "`involution list-models`"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main([*base, *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--pixels", "3;4"])
    assert exit_info.value.code == 2
    assert "ROW,COL" in capsys.readouterr().err

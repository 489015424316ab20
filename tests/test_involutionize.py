"""Tests of involutionize: which convolutions are replaced, why others are kept, trainability."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from involution import Involution2d
from involution.models import create_model, involutionize


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),  # 3 channels: not divisible by 16
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),  # replaced, with a projection
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),  # depthwise
        nn.Conv2d(32, 32, 5, padding=2, dilation=1),  # replaced
        nn.Conv2d(32, 32, 3),  # valid padding: the size would change
        nn.Conv2d(32, 32, 1),  # pointwise
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 5),
    )


def test_replaced_and_skipped_with_reasons() -> None:
    model = small_cnn()
    x = torch.randn(4, 3, 16, 16)
    before = model(x).shape
    report = involutionize(model, kernel_size=5)
    assert report.replaced == ["2", "6"]
    assert set(report.skipped) == {"0", "5", "7", "8"}
    assert "group_channels" in report.skipped["0"]
    assert "groups=32" in report.skipped["5"]
    assert "not 'same'" in report.skipped["7"]
    assert "pointwise" in report.skipped["8"]
    assert isinstance(model[2], Involution2d) and model[2].stride == (2, 2)
    assert model[2].out_channels == 32 and model[2].proj is not None
    assert model[6].kernel_size == (5, 5) and model[6].proj is None
    assert model(x).shape == before
    assert "replaced 2" in str(report)


def test_involutionized_cnn_is_trainable() -> None:
    torch.manual_seed(0)
    model = small_cnn()
    involutionize(model, kernel_size=3)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert all(p.grad is not None for p in model[2].parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_resnet_baseline_becomes_rednet_like() -> None:
    model = create_model("resnet26_cifar", num_classes=10, base_width=16)
    report = involutionize(model)
    blocks = [f"layer{i}.{j}.conv2" for i, n in enumerate((1, 2, 4, 1), 1) for j in range(n)]
    assert set(blocks) <= set(report.replaced)
    assert "stem.conv1" in report.skipped  # 3 input channels
    assert model.layer2[0].conv2.stride == (2, 2)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    again = involutionize(model)
    assert not again.replaced
    assert all("kernel generator" in r for n, r in again.skipped.items() if ".conv2." in n)


def test_involutionized_model_round_trips_through_save_and_load(tmp_path) -> None:
    from involution.models import load_weights, save_weights

    model = create_model("resnet26_cifar", num_classes=10, base_width=16)
    involutionize(model, kernel_size=3, reduction_ratio=2)
    assert model.model_config["involutionize"] == [{"kernel_size": 3, "reduction_ratio": 2}]
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)  # weights that differ from a fresh model's
    path = tmp_path / "m.safetensors"
    save_weights(model, path)
    loaded = load_weights(path)
    assert loaded.model_config == model.model_config
    assert isinstance(loaded.layer1[0].conv2, Involution2d)
    assert loaded.layer1[0].conv2.kernel_size == (3, 3)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_save_weights_refuses_an_involutionize_argument_it_cannot_record(tmp_path) -> None:
    from involution.models import save_weights

    model = create_model("resnet26_cifar", num_classes=10, base_width=16)
    involutionize(model, kernel_size=3, norm_layer=nn.BatchNorm2d)
    with pytest.raises(ValueError, match="must hold only JSON values"):
        save_weights(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()

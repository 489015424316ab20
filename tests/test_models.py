"""Tests of the model zoo: every registered model, at small sizes, plus the exact paper sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import involution
from involution import Involution2d
from involution.models import create_model, list_models, load_weights, save_weights

# Paper sizes with a 1000-class head (Li et al., Table 1; exact counts of the authors' code).
PARAMS = {
    "rednet26": 9_233_166,
    "rednet38": 12_386_986,
    "rednet50": 15_540_806,
    "rednet101": 25_652_950,
    "rednet152": 33_984_582,
}
SMALL = {"base_width": 16}


def small_input(name: str, batch: int = 2, imagenet_size: int = 64) -> torch.Tensor:
    size = 32 if name.endswith("_cifar") else imagenet_size
    return torch.randn(batch, 3, size, size)


def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Sets BN statistics to those of ``x`` and returns the model in eval mode.

    Involution is quadratic in its input, so a deep untrained model in eval mode (unit running
    variance) overflows; statistics of a real batch keep every activation in range.
    """
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.train()(x)
    return model.eval()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registry_names() -> None:
    names = list_models()
    for prefix in ("rednet", "resnet"):
        for depth in (26, 38, 50, 101, 152):
            assert f"{prefix}{depth}" in names
            assert f"{prefix}{depth}_cifar" in names
    assert list_models("rednet5*") == ["rednet50", "rednet50_cifar"]
    assert involution.create_model is create_model
    assert involution.list_models is list_models


@pytest.mark.parametrize("name", list(PARAMS))
def test_exact_parameter_counts(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_model(name: str) -> None:
    model = create_model(name, num_classes=7, zero_init_last=False, **SMALL)
    x = small_input(name, imagenet_size=32)  # 1 x 1 after the last stage
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", list_models())
def test_features_only_matches_feature_info(name: str) -> None:
    model = create_model(name, features_only=True, out_indices=(0, 1, 2, 3, 4), **SMALL).eval()
    x = small_input(name, batch=1)
    with torch.no_grad():
        features = model(x)
    assert len(features) == len(model.feature_info) == 5
    for feature, info in zip(features, model.feature_info, strict=True):
        assert feature.shape[1] == info["num_chs"]
        assert feature.shape[2] == x.shape[2] // info["reduction"]
        assert feature.shape[3] == x.shape[3] // info["reduction"]
        assert hasattr(model, info["module"])


def test_feature_info_and_default_out_indices() -> None:
    model = create_model("rednet50", features_only=True, **SMALL)
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    assert [i["num_chs"] for i in model.feature_info] == [64, 128, 256, 512]
    full = create_model("rednet50")
    assert [i["num_chs"] for i in full.feature_info] == [64, 256, 512, 1024, 2048]
    with pytest.raises(ValueError, match="out_indices"):
        create_model("rednet26", features_only=True, out_indices=(1, 5))


def test_resnet_baseline_has_the_same_skeleton() -> None:
    red = create_model("rednet26", **SMALL)
    res = create_model("resnet26", **SMALL)
    assert any(isinstance(m, Involution2d) for m in red.modules())
    assert not any(isinstance(m, Involution2d) for m in res.modules())
    red_names = {n for n, _ in red.named_modules() if ".conv2." not in n + "."}
    res_names = {n for n, _ in res.named_modules() if ".conv2." not in n + "."}
    assert red_names == res_names
    assert isinstance(res.layer3[0].conv2, nn.Conv2d)
    assert res.layer3[0].conv2.kernel_size == (3, 3) and res.layer3[0].conv2.stride == (2, 2)
    assert red.layer3[0].conv2.kernel_size == (7, 7) and red.layer3[0].conv2.stride == (2, 2)


def test_detection_stem_and_init() -> None:
    model = create_model("rednet50", stem_kernel_size=7)
    assert model.stem.conv2.span.weight.shape == (98, 8, 1, 1)
    for module in model.modules():
        if hasattr(module, "bn3") and hasattr(module, "downsample"):
            assert torch.count_nonzero(module.bn3.weight) == 0
    assert model.layer1[0].conv1.weight.std() > 0


def test_cifar_variant_keeps_resolution_in_stem() -> None:
    model = create_model("rednet26_cifar", num_classes=10, **SMALL)
    assert isinstance(model.maxpool, nn.Identity)
    assert [i["reduction"] for i in model.feature_info] == [1, 1, 2, 4, 8]
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 512, 4, 4)


def test_models_give_the_image_size_they_are_built_for() -> None:
    assert create_model("rednet26_cifar", **SMALL).image_size == 32
    assert create_model("resnet26_cifar", **SMALL).image_size == 32
    assert create_model("rednet26", **SMALL).image_size == 224
    assert create_model("rednet26", stem_stride=1, **SMALL).image_size == 32


def test_head_methods() -> None:
    model = create_model("resnet26_cifar", num_classes=10, drop_rate=0.2, **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(features), model(x))
    assert model.get_classifier() is model.fc
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(0)


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(1)
    model = create_model("rednet26_cifar", zero_init_last=False, **SMALL)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    # BN running statistics move on each forward; compare gradients, which use batch statistics.
    model(x).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], msg=name)


def test_frozen_stages_and_norm_eval() -> None:
    model = create_model("rednet26", features_only=True, frozen_stages=1, norm_eval=True, **SMALL)
    model.train()
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(p.requires_grad for p in model.layer1.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    unfrozen = create_model("rednet26", features_only=True, frozen_stages=0, **SMALL).train()
    assert not unfrozen.stem.training and unfrozen.layer1.training
    with pytest.raises(ValueError, match="frozen_stages"):
        create_model("rednet26", frozen_stages=5)


def test_compile_fullgraph_matches_eager() -> None:
    model = create_model("rednet26_cifar", num_classes=10, zero_init_last=False, **SMALL)
    x = torch.randn(2, 3, 32, 32)
    calibrate(model, torch.cat([x, torch.randn(6, 3, 32, 32)]))
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(compiled, expected)


def test_save_load_round_trip_is_bit_exact(tmp_path) -> None:
    model = create_model(
        "rednet26_cifar", num_classes=10, in_chans=1, zero_init_last=False, **SMALL
    )
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    x = torch.randn(2, 1, 32, 32)
    calibrate(model, torch.cat([x, torch.randn(6, 1, 32, 32)]))
    path = tmp_path / "m.safetensors"
    save_weights(model, path)
    loaded = load_weights(path).eval()
    assert type(loaded) is type(model) and loaded.model_config == model.model_config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        expected = model(x)
        assert torch.isfinite(expected).all()
        assert torch.equal(loaded(x), expected)
    again = create_model("rednet26_cifar", pretrained=path, num_classes=10, in_chans=1, **SMALL)
    assert torch.equal(again.fc.weight, model.fc.weight)
    backbone = create_model(
        "rednet26_cifar", pretrained=path, in_chans=1, features_only=True, **SMALL
    )
    assert torch.equal(backbone.layer4[0].conv3.weight, model.layer4[0].conv3.weight)


def test_save_records_reset_classifier(tmp_path) -> None:
    model = create_model("resnet26_cifar", num_classes=10, **SMALL)
    model.reset_classifier(4)
    save_weights(model, tmp_path / "m.safetensors")
    assert load_weights(tmp_path / "m.safetensors").fc.out_features == 4


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(ValueError, match=r"rednet5O.*did you mean.*'rednet50'"):
        create_model("rednet5O")
    with pytest.raises(ValueError, match=r"`involution list-models`"):
        create_model("alexnet")


def test_unknown_builder_argument_names_the_accepted_ones() -> None:
    with pytest.raises(ValueError) as info:
        create_model("rednet26_cifar", foo=1)
    message = str(info.value)
    assert "'foo' is not an argument of rednet26_cifar" in message
    assert "base_width" in message and "drop_rate" in message and "backend" in message
    assert "\n" not in message
    # The skeleton's own arguments are not the user's to give.
    with pytest.raises(ValueError, match=r"'kind' is not an argument of resnet26"):
        create_model("resnet26", kind="involution")
    with pytest.raises(ValueError, match=r"'layers' is not an argument"):
        create_model("rednet26", layers=(1, 1, 1, 1))


def test_registered_builders_show_their_arguments() -> None:
    import inspect

    from involution.models._registry import get_model_entrypoint

    parameters = inspect.signature(get_model_entrypoint("rednet26_cifar")).parameters
    assert parameters["stem_stride"].default == 1 and parameters["base_width"].default == 64
    assert (
        inspect.signature(get_model_entrypoint("rednet26")).parameters["stem_stride"].default == 2
    )


def test_resnet_models_are_called_resnet() -> None:
    from involution.models.weights import load_state_dict_strict

    resnet = create_model("resnet26_cifar", num_classes=10, **SMALL)
    assert type(resnet).__name__ == "ResNet" and repr(resnet).startswith("ResNet(")
    assert type(create_model("rednet26_cifar", **SMALL)).__name__ == "RedNet"
    with pytest.raises(ValueError, match=r"does not match ResNet; nothing loaded"):
        load_state_dict_strict(resnet, {}, "test")


def test_save_weights_creates_folders_with_ordinary_permissions(tmp_path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = tmp_path / "new" / "folder" / "m.safetensors"
        save_weights(create_model("rednet26_cifar", num_classes=10, **SMALL), path)
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o644
    assert load_weights(path).model_config["name"] == "rednet26_cifar"
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temporary left


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, r"num_classes \(0\)"),
        ({"num_classes": -3}, r"num_classes \(-3\)"),
        ({"in_chans": 0}, r"in_chans \(0\)"),
        ({"base_width": 24}, r"base_width \(24\)"),
        ({"stem_kernel_size": 4}, r"stem_kernel_size \(4\)"),
        ({"drop_rate": 1.5}, r"drop_rate \(1.5\)"),
        ({"pretrained": True}, r"pretrained \(True\)"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        create_model("rednet26_cifar", **kwargs)


def test_pretrained_mismatches_load_nothing(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    save_weights(create_model("rednet26_cifar", num_classes=10, **SMALL), path)
    with pytest.raises(ValueError, match=r"num_classes \(5\).*10 classes"):
        create_model("rednet26_cifar", pretrained=path, num_classes=5, **SMALL)
    with pytest.raises(ValueError, match=r"in_chans \(1\).*3 input channels"):
        create_model("rednet26_cifar", pretrained=path, num_classes=10, in_chans=1, **SMALL)
    with pytest.raises(ValueError, match=r"nothing loaded\.\n  missing \(\d+\)"):
        create_model("rednet38_cifar", pretrained=path, num_classes=10, **SMALL)
    with pytest.raises(FileNotFoundError, match="nope"):
        create_model("rednet26_cifar", pretrained=tmp_path / "nope.safetensors")


def test_load_state_dict_strict_leaves_model_untouched(tmp_path) -> None:
    from involution.models.weights import load_state_dict_strict

    model = create_model("rednet26_cifar", num_classes=10, **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in before.items()}
    state["fc.weight"] = torch.randn(9, model.num_features)
    del state["stem.bn1.bias"]
    state["extra.weight"] = torch.randn(2)
    with pytest.raises(ValueError) as info:
        load_state_dict_strict(model, state, "test")
    message = str(info.value)
    assert "stem.bn1.bias" in message and "extra.weight" in message and "fc.weight" in message
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_corrupted_weight_files(tmp_path, damage) -> None:
    path = tmp_path / "m.safetensors"
    save_weights(create_model("rednet26_cifar", num_classes=10, **SMALL), path)
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytes(b ^ 0x5A for b in data[:64]) + data[64:]
    else:
        data = data[:8] + b"{not json" + data[17:]
    path.write_bytes(data)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_weights(path)

"""Tests of the converter from the authors' RedNet checkpoints, end to end.

The authors' model is rebuilt here from their description (module names and the naive unfold
involution of d-li14/involution); its involution is checked against outputs of their code
(golden file), and its state_dict against their key list, before it serves as the oracle.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from involution.cli.__main__ import main as cli_main
from involution.models import create_model, load_weights
from involution.models.convert import from_official, load_official_checkpoint, to_official
from involution.models.rednet import DEPTHS

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"
KEYS_FILE = REFERENCE / "rednet_official_keys.tsv"
GOLDEN_FILE = REFERENCE / "official_involution_golden.safetensors"


def official_keys() -> dict[int, dict[str, tuple[int, ...]]]:
    if not KEYS_FILE.is_file():
        pytest.skip(f"reference data missing: {KEYS_FILE.name} not in ../shared/reference/")
    keys: dict[int, dict[str, tuple[int, ...]]] = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        depth, key, shape = line.split("\t")
        keys.setdefault(int(depth), {})[key] = tuple(
            int(s) for s in shape.strip("[]").split(",") if s
        )
    return keys


class ConvModule(nn.Module):
    """mmcv's ConvModule as the authors use it: conv, optional BN, optional ReLU."""

    def __init__(self, cin, cout, k, stride=1, padding=0, bias=False, norm=True, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, bias=bias)
        self.bn = nn.BatchNorm2d(cout) if norm else None
        self.activate = nn.ReLU() if act else None

    def forward(self, x):
        x = self.conv(x)
        x = x if self.bn is None else self.bn(x)
        return x if self.activate is None else self.activate(x)


class OfficialInvolution(nn.Module):
    """The authors' naive involution: reduction 4, 16 channels per group, unfold aggregation."""

    def __init__(self, channels, kernel_size, stride):
        super().__init__()
        self.k, self.stride, self.channels = kernel_size, stride, channels
        self.groups = channels // 16
        self.conv1 = ConvModule(channels, channels // 4, 1)
        self.conv2 = ConvModule(
            channels // 4, kernel_size**2 * self.groups, 1, bias=True, norm=False, act=False
        )
        self.avgpool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()
        self.unfold = nn.Unfold(kernel_size, 1, (kernel_size - 1) // 2, stride)

    def forward(self, x):
        weight = self.conv2(self.conv1(self.avgpool(x)))
        b, _, h, w = weight.shape
        weight = weight.view(b, self.groups, self.k**2, h, w).unsqueeze(2)
        out = self.unfold(x).view(b, self.groups, self.channels // self.groups, self.k**2, h, w)
        return (weight * out).sum(dim=3).view(b, self.channels, h, w)


class OfficialBottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = OfficialInvolution(width, 7, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class OfficialRedNet(nn.Module):
    """mmcls ImageClassifier(backbone=RedNet, head=LinearClsHead) with the authors' names."""

    def __init__(self, depth, num_classes=1000, stem_kernel=3):
        super().__init__()
        backbone = nn.Module()
        backbone.stem = nn.Sequential(
            ConvModule(3, 32, 3, 2, 1),
            OfficialInvolution(32, stem_kernel, 1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            ConvModule(32, 64, 3, 1, 1),
        )
        backbone.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, blocks in enumerate(DEPTHS[depth]):
            width = 64 * 2**i
            layer = [
                OfficialBottleneck(cin if b == 0 else 4 * width, width, 2 if i and b == 0 else 1)
                for b in range(blocks)
            ]
            setattr(backbone, f"layer{i + 1}", nn.Sequential(*layer))
            cin = 4 * width
        self.backbone = backbone
        self.head = nn.Module()
        self.head.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        b = self.backbone
        x = b.maxpool(b.stem(x))
        for i in range(1, 5):
            x = getattr(b, f"layer{i}")(x)
        return self.head.fc(x.mean((2, 3)))


def randomize(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Random weights and BN statistics of a real batch; the model comes back in eval mode."""
    torch.manual_seed(3)
    for name, param in model.named_parameters():
        if param.dim() > 1:
            nn.init.kaiming_normal_(param)
        elif name.endswith("weight"):
            nn.init.uniform_(param, 0.5, 1.5)
        else:
            nn.init.normal_(param, 0, 0.1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def test_oracle_involution_reproduces_the_authors_outputs() -> None:
    if not GOLDEN_FILE.is_file():
        pytest.skip(f"reference data missing: {GOLDEN_FILE.name} not in ../shared/reference/")
    from safetensors.torch import load_file

    golden = load_file(GOLDEN_FILE)
    cases = {key.split("/")[0] for key in golden}
    assert len(cases) == 4
    for case in sorted(cases):
        channels, k, s = (int(part[1:]) for part in case.split("_"))
        module = OfficialInvolution(channels, k, s)
        prefix = f"{case}/state/"
        module.load_state_dict(
            {k[len(prefix) :]: v for k, v in golden.items() if k.startswith(prefix)}
        )
        with torch.no_grad():
            out = module.eval()(golden[f"{case}/input"])
        torch.testing.assert_close(out, golden[f"{case}/output"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", sorted(DEPTHS))
def test_key_mapping_covers_every_official_key(depth: int) -> None:
    keys = official_keys()[depth]
    with torch.device("meta"):
        oracle = OfficialRedNet(depth)
        ours = create_model(f"rednet{depth}")
    official = {k: v.shape for k, v in oracle.state_dict().items()}
    expected = {f"backbone.{k}": shape for k, shape in keys.items()}
    expected |= {"head.fc.weight": (1000, 2048), "head.fc.bias": (1000,)}
    assert {
        k: tuple(v) for k, v in official.items()
    } == expected  # the oracle is the authors' layout
    checkpoint = {k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    converted = from_official({"meta": {}, "state_dict": checkpoint})
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in ours.state_dict().items()
    }
    assert set(to_official(converted)) == set(expected)


def test_detection_stem_keys() -> None:
    keys = official_keys()[50]
    checkpoint = {f"backbone.{k}": torch.empty(shape, device="meta") for k, shape in keys.items()}
    checkpoint["backbone.stem.1.conv2.conv.weight"] = torch.empty(98, 8, 1, 1, device="meta")
    checkpoint["backbone.stem.1.conv2.conv.bias"] = torch.empty(98, device="meta")
    converted = from_official(checkpoint)
    with torch.device("meta"):
        ours = create_model("rednet50", features_only=True, stem_kernel_size=7)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in ours.state_dict().items()
    }


def test_converted_model_gives_the_authors_logits(tmp_path) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    # BN statistics from a batch that holds x keep the quadratic involutions in range.
    calibration = torch.cat(
        [x, torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))]
    )
    oracle = randomize(OfficialRedNet(26, num_classes=10), calibration)
    path = tmp_path / "official.pth"
    torch.save({"meta": {"epoch": 130}, "state_dict": oracle.state_dict()}, path)
    model = load_official_checkpoint(path)
    assert model.model_config["name"] == "rednet26" and model.num_classes == 10
    with torch.no_grad():
        expected = oracle(x)
        assert torch.isfinite(expected).all() and expected.std() > 0
        torch.testing.assert_close(model(x), expected, rtol=5e-4, atol=5e-4)
    # And back: our weights load into the authors' model unchanged.
    back = OfficialRedNet(26, num_classes=10)
    back.load_state_dict(to_official(model.state_dict()))
    for key, value in oracle.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key

    out = tmp_path / "rednet26.safetensors"
    assert cli_main(["convert", str(path), str(out)]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_weights(out).eval()(x), expected, rtol=5e-4, atol=5e-4)


def test_strict_errors_list_every_problem(tmp_path) -> None:
    keys = official_keys()[26]
    state = {f"backbone.{k}": torch.zeros(shape) for k, shape in keys.items()}
    state["head.fc.weight"], state["head.fc.bias"] = torch.randn(10, 2048), torch.randn(10)
    del state["backbone.layer3.1.bn2.bias"]
    state["backbone.layer1.0.conv1.weight"] = torch.randn(64, 64, 3, 3)
    with pytest.raises(ValueError) as info:
        load_official_checkpoint(dict(state))
    message = str(info.value)
    assert "nothing loaded" in message
    assert "missing (1)" in message and "layer3.1.bn2.bias" in message
    assert "shape mismatch (1)" in message and "layer1.0.conv1.weight" in message
    state["neck.lateral.weight"] = torch.randn(2)
    state["backbone.stem.1.conv3.weight"] = torch.randn(2)
    with pytest.raises(ValueError, match=r"2 key\(s\).*nothing converted") as info:
        from_official(state)
    assert "neck.lateral.weight" in str(info.value) and "stem.1.conv3.weight" in str(info.value)
    del state["neck.lateral.weight"], state["backbone.stem.1.conv3.weight"]
    without_layer4 = {k: v for k, v in state.items() if ".layer4." not in k}
    with pytest.raises(ValueError, match=r"blocks per stage \(1, 2, 4, 0\) match no RedNet depth"):
        load_official_checkpoint(without_layer4)


def test_wrong_model_name_and_bad_files(tmp_path) -> None:
    oracle = OfficialRedNet(26, num_classes=10)
    path = tmp_path / "official.pth"
    torch.save({"meta": {}, "state_dict": oracle.state_dict()}, path)
    with pytest.raises(ValueError, match=r"missing \("):
        load_official_checkpoint(path, name="rednet38")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cannot be read with torch\.load"):
        load_official_checkpoint(truncated)
    assert cli_main(["convert", str(truncated), str(tmp_path / "x.safetensors")]) == 1
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(FileNotFoundError):
        load_official_checkpoint(tmp_path / "missing.pth")

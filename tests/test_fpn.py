"""Tests of the involution FPN neck on model feature lists and on arbitrary maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from involution import Involution2d
from involution.models import FPN, create_model


@pytest.mark.parametrize("name", ["rednet26", "resnet26"])
def test_fpn_on_backbone_features(name: str) -> None:
    backbone = create_model(name, features_only=True, base_width=16)
    neck = FPN([i["num_chs"] for i in backbone.feature_info], out_channels=32, num_outs=5)
    x = torch.randn(2, 3, 64, 64)
    outs = neck(backbone(x))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 64 // r, 64 // r) for r in (4, 8, 16, 32, 64)]
    assert all(torch.isfinite(o).all() for o in outs)
    sum(o.square().mean() for o in outs).backward()
    for pname, param in neck.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname
    assert sum(isinstance(m, Involution2d) for m in neck.modules()) == 4


def test_top_down_pathway_reaches_the_finest_level() -> None:
    neck = FPN([16, 32], out_channels=16, involution=False).eval()
    fine, coarse = torch.randn(1, 16, 8, 8), torch.randn(1, 32, 4, 4)
    base = neck([fine, coarse])[0]
    changed = neck([fine, coarse + torch.randn_like(coarse)])[0]
    assert not torch.allclose(base, changed)  # the coarse map feeds the fine output
    assert isinstance(neck.output_convs[0], nn.Conv2d)


def test_odd_sizes_and_bad_inputs() -> None:
    neck = FPN([16, 32, 64], out_channels=16)
    outs = neck([torch.randn(1, 16, 15, 13), torch.randn(1, 32, 8, 7), torch.randn(1, 64, 4, 4)])
    assert [o.shape[2:] for o in outs] == [(15, 13), (8, 7), (4, 4)]
    with pytest.raises(ValueError, match=r"features has 2 maps, expected 3"):
        neck([torch.randn(1, 16, 8, 8), torch.randn(1, 32, 4, 4)])
    with pytest.raises(ValueError, match=r"features\[1\] has shape \(1, 16, 4, 4\)"):
        neck([torch.randn(1, 16, 8, 8), torch.randn(1, 16, 4, 4), torch.randn(1, 64, 2, 2)])
    with pytest.raises(ValueError, match=r"num_outs \(1\)"):
        FPN([16, 32], num_outs=1)
    with pytest.raises(ValueError, match=r"out_channels \(100\) must be a multiple of 16"):
        FPN([16, 32], out_channels=100)
    assert FPN([16, 32], out_channels=100, involution=False).out_channels == 100
    with pytest.raises(ValueError, match=r"out_channels \(True\) must be a positive int"):
        FPN([16, 32], out_channels=True)

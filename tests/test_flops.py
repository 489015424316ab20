"""Tests of the FLOP counter: the op's formula, exact counts on small nets, the paper's numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from involution import Involution2d
from involution.functional import involution2d
from involution.models import count_macs, create_model

# Paper (Li et al., Table 1), GMACs at 224 x 224 with a 1000-class head.
PAPER_GMACS = {
    "rednet26": 1.73,
    "rednet38": 2.22,
    "rednet50": 2.71,
    "rednet101": 4.74,
    "rednet152": 6.79,
}


@pytest.mark.parametrize(("kernel_size", "stride"), [(3, 1), (7, 2), (5, 3)])
def test_op_formula_forward_and_backward(kernel_size: int, stride: int) -> None:
    x = torch.randn(2, 32, 13, 11, requires_grad=True)
    ho, wo = (13 - 1) // stride + 1, (11 - 1) // stride + 1
    w = torch.randn(2, 4, kernel_size**2, ho, wo, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = involution2d(x, w, kernel_size, stride=stride)
    macs = 2 * 32 * ho * wo * kernel_size**2
    assert out.shape == (2, 32, ho, wo)
    assert counter.get_total_flops() == 2 * macs
    with FlopCounterMode(display=False) as counter:
        out.backward(torch.randn_like(out))
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.involution.grad_input] == 2 * macs
    assert counts[torch.ops.involution.grad_kernel] == 2 * macs


def test_count_macs_of_a_small_net_by_hand() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=True),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        Involution2d(16, 5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    h = w = 9
    conv = 16 * h * w * 3 * 9
    reduce, span = 4 * h * w * 16, 25 * h * w * 4
    aggregation = 16 * h * w * 25
    linear = 16 * 10
    macs = conv + reduce + span + aggregation + linear
    assert count_macs(net, (1, 3, h, w), include_elementwise=False) == macs
    elementwise = (
        16 * h * w  # conv bias
        + 2 * 16 * h * w  # affine BN
        + 16 * h * w  # ReLU
        + 25 * h * w  # span bias
        + 2 * 4 * h * w  # the involution's BN
        + 4 * h * w  # and its ReLU
        + 16 * h * w  # global pooling
    )
    assert count_macs(net, (1, 3, h, w)) == macs + elementwise
    assert count_macs(net, (3, 3, h, w)) == 3 * (macs + elementwise)
    assert net.training  # restored after counting in eval mode


@pytest.mark.parametrize("name", list(PAPER_GMACS))
def test_rednet_macs_match_the_paper(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
    gmacs = count_macs(model) / 1e9
    assert gmacs == pytest.approx(PAPER_GMACS[name], rel=0.02)


def test_resnet_baseline_costs_more_than_rednet() -> None:
    with torch.device("meta"):
        red, res = create_model("rednet50"), create_model("resnet50")
    assert count_macs(res) > count_macs(red)

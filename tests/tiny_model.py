"""A tiny registered image classifier with involutions, for fast tests of the tool commands."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from involution import Involution2d
from involution.models import _registry

TINY_MODEL = "tiny_involution_net"


def _tiny_involution_net(
    num_classes: int = 1000,
    in_chans: int = 3,
    features_only: bool = False,
    out_indices: object = None,
    base_width: int = 16,
) -> nn.Module:
    width = base_width
    net = nn.Sequential(
        nn.Conv2d(in_chans, width, 3, stride=2, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        Involution2d(width, kernel_size=5, stride=2, group_channels=8),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        Involution2d(width, kernel_size=3, group_channels=8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )
    # Non-trivial normalization statistics, so that exported and eager outputs differ if the
    # involutions were exported wrongly.
    gen = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return net


def register_tiny_model(monkeypatch: pytest.MonkeyPatch) -> str:
    """Registers the tiny model for one test (monkeypatch removes it after); returns its name."""
    monkeypatch.setitem(_registry._MODELS, TINY_MODEL, _tiny_involution_net)
    return TINY_MODEL

"""Where one CPU training step of RedNet-26 (the demo's model) spends its time.

Profiles forward, loss, backward and an SGD step of ``rednet26_cifar`` at the demo's settings
(batch 32, 1x32x32 inputs, base width 16) and splits the step's wall time into the involution
ops (the ``involution::`` ops and their backward; with a backend that has fused passes, such as
the cpu one, these include the kernel generator's span), the span convolution that writes the
G*K^2-channel kernel map where the span runs apart (found by its weight's shape), and the rest.
ResNet-26's step is timed beside it, in the same memory format, for the ratio the issue asks for.

The two models' steps alternate, and the ratio is the median of the per-round ratios, so that a
busy machine slows both alike.

Usage:
    PYTHONPATH=src python benchmarks/profile_rednet_cpu.py [--steps 5] [--backend auto]
        [--channels-last]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from involution import create_model
from involution.nn import _InvolutionNd
from involution.training import TrainConfig
from involution.training.memory import keep_freed_memory
from involution.training.optim import build_optimizer


def demo_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``involution demo`` trains with (its lr; the default weight decay)."""
    return build_optimizer(model, "sgd", 0.1, TrainConfig.weight_decay)


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> None:
    """One SGD step of cross-entropy training (also timed by bench_cpu_ab.py)."""
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _paired_ms(
    models: list[nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int
) -> list[list[float]]:
    """Step times in ms, the models' steps taken in turn: each round sees the same load."""
    opts = [demo_optimizer(m) for m in models]
    for model, opt in zip(models, opts, strict=True):
        train_step(model, opt, x, y)
    rounds = []
    for _ in range(steps):
        times = []
        for model, opt in zip(models, opts, strict=True):
            start = time.perf_counter()
            train_step(model, opt, x, y)
            times.append((time.perf_counter() - start) * 1e3)
        rounds.append(times)
    return rounds


def _shares(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    spans = {m.span.out_channels for m in model.modules() if isinstance(m, _InvolutionNd)}

    def kind(event) -> str | None:
        if event.name.startswith("involution::"):
            return "involution ops"
        if "convolution" in event.name or event.name == "aten::conv2d":
            for shape in event.input_shapes:
                if len(shape) == 4 and shape[0] in spans and shape[2:] == [1, 1]:
                    return "span conv"
        return None

    opt = demo_optimizer(model)
    train_step(model, opt, x, y)
    with torch.profiler.profile(record_shapes=True) as prof:
        start = time.perf_counter()
        train_step(model, opt, x, y)
        total = (time.perf_counter() - start) * 1e6
    found = {"span conv": 0.0, "involution ops": 0.0}
    for event in prof.events():
        k = kind(event)
        parent, outer = event.cpu_parent, True
        while parent is not None:
            outer = outer and kind(parent) is None
            parent = parent.cpu_parent
        if k is not None and outer:
            found[k] += event.cpu_time_total
    found["rest"] = total - sum(found.values())
    return {name: us / total for name, us in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--backend", default="auto", help="involution backend (default auto)")
    parser.add_argument(
        "--channels-last", action="store_true", help="models and images in channels_last"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(32, 1, 32, 32)
    y = torch.randint(0, 10, (32,))
    kwargs = {"num_classes": 10, "in_chans": 1, "base_width": 16}
    rednet = create_model("rednet26_cifar", **kwargs)
    for m in rednet.modules():
        if isinstance(m, _InvolutionNd):
            m.backend = args.backend
    resnet = create_model("resnet26_cifar", **kwargs)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        rednet = rednet.to(memory_format=torch.channels_last)
        resnet = resnet.to(memory_format=torch.channels_last)
    # As fit() trains: freed memory stays mapped from one step to the next.
    with keep_freed_memory() as kept:
        rounds = _paired_ms([rednet, resnet], x, y, args.steps)
        shares = _shares(rednet, x, y)
    red_ms = statistics.median(r[0] for r in rounds)
    res_ms = statistics.median(r[1] for r in rounds)
    ratio = statistics.median(r[0] / r[1] for r in rounds)
    layout = "channels_last" if args.channels_last else "NCHW"
    print(
        f"threads: {torch.get_num_threads()}  backend: {args.backend}  layout: {layout}  "
        f"freed memory kept: {kept}"
    )
    print(f"rednet26_cifar step: {red_ms:.1f} ms  resnet26_cifar step: {res_ms:.1f} ms (medians)")
    print(f"ratio rednet/resnet: {ratio:.2f} (median of the per-round ratios)")
    for name, share in shares.items():
        print(f"rednet26 {name}: {share * 100:.0f} %")


if __name__ == "__main__":
    main()

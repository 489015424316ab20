"""The training loop: a NaN loss stops with the step, accumulation equals a bigger batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from involution.training.distributed import DistInfo
from involution.training.engine import NonFiniteLossError, evaluate, train_one_epoch
from involution.training.optim import build_optimizer, build_scheduler, warmup_cosine

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class PoisonAfter(nn.Module):
    """A linear classifier whose output turns NaN from the ``n``-th forward call on."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)
        self.calls, self.n = 0, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.fc(x.flatten(1))
        return out * float("nan") if self.calls >= self.n else out


def _batches(n: int, size: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, 2, 2, generator=gen), torch.randint(0, 3, (size,), generator=gen), [])
        for _ in range(n)
    ]


def _train(model, loader, grad_accum=1):
    opt = build_optimizer(model, "sgd", 0.1, 1e-4)
    sched = build_scheduler(opt, total_steps=100, warmup_steps=0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return train_one_epoch(model, loader, opt, sched, scaler, CPU, 0, 0, grad_accum=grad_accum)


def test_nan_loss_stops_naming_the_step():
    model = PoisonAfter(3)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 1, optimizer step 3") as e:
        _train(model, _batches(5))
    assert e.value.step == 2
    # The poisoned step did not update the weights: they are finite.
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_grad_accumulation_equals_the_full_batch():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    b = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    b.load_state_dict(a.state_dict())
    small = _batches(4, size=4)
    big = [
        (torch.cat([small[i][0], small[i + 1][0]]), torch.cat([small[i][1], small[i + 1][1]]), [])
        for i in (0, 2)
    ]
    ra = _train(a, small, grad_accum=2)
    rb = _train(b, big, grad_accum=1)
    assert ra.steps == rb.steps == 2
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_empty_batches_of_corrupt_images_are_skipped():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    batches = _batches(3)
    batches.insert(1, (torch.empty(0), torch.empty(0, dtype=torch.long), [7, 8]))
    result = _train(model, batches)
    assert result.samples == 12 and result.skipped == [7, 8]


def test_evaluate_top1_top5_and_loss():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))
    loader = _batches(3, size=5, seed=4)
    result = evaluate(model, loader, CPU)
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])
    with torch.no_grad():
        logits = model(x)
    assert result.samples == 15
    assert result.top1 == pytest.approx((logits.argmax(1) == y).float().mean().item())
    top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
    assert result.top5 == pytest.approx(top5)
    expected = nn.functional.cross_entropy(logits, y).item()
    assert result.loss == pytest.approx(expected, rel=1e-5)


def test_evaluate_has_no_top5_with_5_classes_or_fewer():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    result = evaluate(model, _batches(2, size=5, seed=1), CPU, num_classes=3)
    assert result.top5 is None and result.as_dict()["top5"] is None
    assert evaluate(model, _batches(2, size=5, seed=1), CPU).top5 is None  # 3 logits
    six = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    assert evaluate(six, _batches(2, size=5, seed=1), CPU).top5 is not None


@pytest.mark.parametrize(
    ("name", "plain"),
    [
        ("sgd", lambda p: torch.optim.SGD(p, 0.1, 0.9, nesterov=True, weight_decay=1e-4)),
        ("adamw", lambda p: torch.optim.AdamW(p, 0.1, weight_decay=1e-4)),
    ],
)
def test_optimizer_steps_like_the_plain_one(name, plain):
    """The fused optimizer build_optimizer picks on the CPU updates as torch's for-loop one does."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)) for _ in "ab"]
    models[1].load_state_dict(models[0].state_dict())
    opts = [build_optimizer(models[0], name, 0.1, 1e-4), plain(models[1].parameters())]
    start = [p.detach().clone() for p in models[0].parameters()]
    assert opts[0].defaults["fused"] and not opts[1].defaults.get("fused")
    for _ in range(3):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, opt in zip(models, opts, strict=True):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for fused, loop, before in zip(
        models[0].parameters(), models[1].parameters(), start, strict=True
    ):
        torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-6)
        assert not torch.equal(fused, before)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10, 0.25) == pytest.approx(0.25)
    assert warmup_cosine(10, 100, 10, 0.25) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.25) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 0.25) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="warmup"):
        build_scheduler(build_optimizer(nn.Linear(2, 2), "sgd", 0.1, 0), 10, 10)

"""The recipe: warm-up + cosine schedule, its wiring into AdamW, and the EMA."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from mvcompile.train.recipe import (  # noqa: E402
    EMA,
    Schedule,
    default_warmup,
    make_optimizer,
    make_scheduler,
)

PAPER = Schedule(total_steps=375_000, warmup_steps=3000, lr_max=0.002, lr_init=0.0002,
                 lr_min=0.0002)


def test_schedule_warms_up_linearly_then_decays_by_cosine() -> None:
    assert PAPER.lr(0) == pytest.approx(0.0002)
    assert PAPER.lr(1500) == pytest.approx(0.0011)
    assert PAPER.lr(3000) == pytest.approx(0.002)
    middle = 3000 + (375_000 - 3000) // 2
    assert PAPER.lr(middle) == pytest.approx(0.0011)
    assert PAPER.lr(375_000) == pytest.approx(0.0002)
    lrs = [PAPER.lr(t) for t in range(3000, 375_001, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_warmup_is_the_papers_3k_steps_or_5_percent_of_short_runs() -> None:
    assert default_warmup(375_000) == 3000
    assert default_warmup(600) == 30
    assert default_warmup(3) == 1


def test_scheduler_drives_adamw_step_by_step() -> None:
    model = torch.nn.Linear(2, 2)
    schedule = Schedule(10, 2, 0.002, 0.0002, 0.0002)
    optimizer = make_optimizer(model, schedule.lr_max, 0.01)
    scheduler = make_scheduler(optimizer, schedule)
    assert optimizer.param_groups[0]["weight_decay"] == 0.01
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([schedule.lr(t) for t in range(10)])
    assert seen[2] == pytest.approx(0.002)
    assert seen[6] == pytest.approx(0.0002 + 0.0009 * (1 + math.cos(math.pi * 0.5)))


def test_ema_averages_weights_and_batchnorm_statistics() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    torch.nn.init.zeros_(model[0].weight)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].running_mean.fill_(4.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)  # d = min(0.5, 2/11) = 2/11
    d = 2 / 11
    assert ema.module[0].weight.item() == pytest.approx(1 - d)
    assert ema.module[1].running_mean.item() == pytest.approx(4 * (1 - d))
    assert ema.module[1].num_batches_tracked.item() == 7
    assert not any(p.requires_grad for p in ema.module.parameters())
    restored = EMA(model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.steps == 1 and restored.module[0].weight.item() == pytest.approx(1 - d)

from __future__ import annotations

import pytest
import torch

from cifar_cli.engine.optim import build_optimizer, build_scheduler
from cifar_cli.models import build_model
from cifar_cli.settings import OptimSettings, SchedulerSettings


def test_weights_and_biases_get_their_own_lr_and_decay() -> None:
    model = build_model("airbench", 0.25)
    settings = OptimSettings(name="sgd", lr=1.5, weight_decay=1e-3, bias_lr_scale=64, bias_weight_decay=2e-5)
    weights, biases = build_optimizer(model, settings).param_groups
    assert (weights["lr"], weights["weight_decay"]) == (1.5, 1e-3)
    assert (biases["lr"], biases["weight_decay"]) == (96.0, 2e-5)
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    frozen = {id(model.whiten.weight)} | {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
    }
    assert not frozen & {id(p) for group in (weights, biases) for p in group["params"]}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # 10 steps, 2 of warm-up from 0.2: 0.2, 0.6, then linear from 1.0 towards final 0.1 over 8 steps.
        ("linear", [0.2, 0.6, 1.0, 0.8875, 0.775, 0.6625, 0.55, 0.4375, 0.325, 0.2125]),
        ("none", [0.2, 0.6, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_step_schedules(name: str, expected: list[float]) -> None:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    settings = SchedulerSettings(name=name, warmup_epochs=2, warmup_start_factor=0.2, final_lr_factor=0.1)
    scheduler = build_scheduler(optimizer, settings, epochs=10, steps_per_epoch=1)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(expected)


def test_cosine_ends_at_the_final_factor() -> None:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=2.0)
    scheduler = build_scheduler(optimizer, SchedulerSettings(name="cosine", final_lr_factor=0.05), 4, 5)
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)

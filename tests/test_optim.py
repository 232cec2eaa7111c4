from __future__ import annotations

import pytest
import torch

from cifar_cli.config.sections import OptimSettings, SchedulerSettings
from cifar_cli.models import build_model
from cifar_cli.recipe.optim import build_optimizer, build_scheduler


def test_weights_and_biases_get_their_own_lr_and_decay() -> None:
    model = build_model("airbench", 0.25)
    settings = OptimSettings(name="sgd", lr=1.5, weight_decay=1e-3, bias_lr_scale=64, bias_weight_decay=2e-5)
    weights, biases = build_optimizer(model, settings).param_groups
    assert (weights["lr"], weights["weight_decay"]) == (1.5, 1e-3)
    assert (biases["lr"], biases["weight_decay"]) == (96.0, 2e-5)
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    frozen = {id(model.whiten.weight)} | {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
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


def test_orthogonalize_flattens_the_singular_values() -> None:
    from cifar_cli.recipe.muon import orthogonalize

    torch.manual_seed(0)
    matrix = torch.randn(32, 8) @ torch.diag(torch.tensor([100.0, 30, 10, 3, 1, 0.3, 0.1, 0.03])) @ torch.randn(8, 72)
    singular_values = torch.linalg.svdvals(orthogonalize(matrix, steps=5).float())[:8]
    assert singular_values.max() < 1.6 and singular_values[:4].min() > 0.3  # was a spread of 3,000x


def test_muon_groups_and_step() -> None:
    from cifar_cli.recipe.muon import MuonSGD

    torch.manual_seed(0)
    model = build_model("airbench", 0.25)
    settings = OptimSettings(name="muon", lr=0.5, momentum=0.85, nesterov=True, muon_lr=0.2, muon_momentum=0.6)
    optimizer = build_optimizer(model, settings)
    assert isinstance(optimizer, MuonSGD)
    weights, biases, filters = optimizer.param_groups
    assert all(p.ndim == 4 for p in filters["params"]) and filters["use_muon"] and filters["momentum"] == 0.6
    assert all(p.ndim == 2 for p in weights["params"]) and not weights["use_muon"]
    model.init_from_data(torch.randn(16, 3, 32, 32))
    model(torch.randn(8, 3, 32, 32)).logsumexp(1).sum().backward()
    conv = model.groups[1].conv2.weight
    optimizer.step()
    assert conv.norm().item() == pytest.approx(len(conv) ** 0.5, rel=0.1)  # kept near sqrt(out_channels)


def test_sgd_groups_match_torch_sgd() -> None:
    """The group's update made at once (foreach) is torch.optim.SGD's, also for a tensor whose first gradient
    comes steps later (a frozen body thawed) while the others' momentum goes on."""
    from cifar_cli.recipe.muon import MuonSGD

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    mine = MuonSGD([{"params": ours, "weight_decay": 0.01}], lr=0.1, momentum=0.9, nesterov=True)
    torch_sgd = torch.optim.SGD(reference, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    for step in range(4):
        for parameters, optimizer in ((ours, mine), (reference, torch_sgd)):
            parameters[0].grad = torch.full((5,), float(step + 1))
            parameters[1].grad = torch.full((3, 2), -float(step)) if step >= 2 else None
            optimizer.step()
    assert all(torch.allclose(a, b) for a, b in zip(ours, reference))


def test_orthogonalize_is_the_quintic_iteration() -> None:
    """The fused multiply-adds compute airbench's a x + (b G + c G G) x, G = x x^T."""
    from cifar_cli.recipe.muon import NEWTON_SCHULZ, orthogonalize

    torch.manual_seed(0)
    matrix = torch.randn(16, 40, dtype=torch.float64)
    x = matrix / (matrix.norm() + 1e-7)
    a, b, c = NEWTON_SCHULZ
    for _ in range(3):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    assert torch.allclose(orthogonalize(matrix, dtype=torch.float64), x)
    assert torch.allclose(orthogonalize(matrix.T, dtype=torch.float64), x.T)  # tall: transposed first


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_cpu_optimizers_use_fused_kernels_with_the_same_steps(name: str) -> None:
    torch.manual_seed(0)
    model, twin = build_model("seed-cnn", 0.25).eval(), build_model("seed-cnn", 0.25).eval()
    twin.load_state_dict(model.state_dict())
    fused = build_optimizer(model, OptimSettings(name=name, lr=0.01, momentum=0.9, weight_decay=5e-4))
    assert fused.defaults["fused"] is True
    # The same groups over the twin's parameters, with torch's per-tensor implementation.
    twin_of = {id(p): q for p, q in zip(model.parameters(), twin.parameters())}
    plain = type(fused)(
        [{**group, "params": [twin_of[id(p)] for p in group["params"]], "fused": False} for group in fused.param_groups]
    )
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    for net, optimizer in ((model, fused), (twin, plain)):
        for _ in range(3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(images), labels).backward()
            optimizer.step()
    # Fused kernels add in another order: on an AVX2 EPYC, Adam's weights differed by 1.2e-6 after 3 steps of
    # lr 0.01. 1e-5 is still a thousandth of one step, so a wrong update rule cannot pass.
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_muon_orthogonalises_in_the_precision_it_is_given() -> None:
    from cifar_cli.recipe.muon import orthogonalize

    torch.manual_seed(0)
    matrix = torch.randn(16, 72)
    fp32 = orthogonalize(matrix, dtype=torch.float32)
    bf16 = orthogonalize(matrix, dtype=torch.bfloat16)
    assert fp32.dtype == bf16.dtype == torch.float32
    assert not torch.equal(fp32, bf16)  # computed differently ...
    torch.testing.assert_close(fp32, bf16, atol=0.05, rtol=0.05)  # ... to the same approximate U V^T
    model = build_model("airbench", 0.25)
    for dtype in (torch.float32, torch.bfloat16):
        assert build_optimizer(model, OptimSettings(name="muon"), dtype).matmul_dtype == dtype


def _whitening_run(schedule: str, epochs: int = 8, steps_per_epoch: int = 10) -> tuple[torch.optim.Optimizer, object]:
    """fast's optimiser and schedule for airbench with `model.whiten_bias_schedule=schedule`, as training builds them."""
    from cifar_cli.config.settings import load_settings
    from cifar_cli.train.setup import whitening_bias_apart

    settings = load_settings(None, {"preset": "fast", "model": {"whiten_bias_schedule": schedule}})
    model = build_model("airbench", 0.25)
    optimizer = build_optimizer(model, settings.optim, torch.float32, whitening_bias_apart(model, settings.model))
    scheduler = build_scheduler(
        optimizer, settings.scheduler, epochs, steps_per_epoch, apart_epochs=settings.model.whiten_bias_epochs
    )
    return optimizer, scheduler


def _lrs(optimizer: torch.optim.Optimizer, scheduler: object, steps: int) -> list[list[float]]:
    seen = []
    for _ in range(steps):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


def test_the_whitening_bias_decays_to_zero_over_its_epochs_on_its_own_schedule() -> None:
    """decay (the records'): the whitening bias's lr falls linearly from the biases' lr to 0 over
    whiten_bias_epochs (3 x 10 steps); the other groups keep the main linear schedule over all 80 steps."""
    optimizer, scheduler = _whitening_run("decay")
    weights, biases, whitening, filters = optimizer.param_groups
    assert whitening["decays_apart"] and len(whitening["params"]) == 1 and whitening["params"][0].shape == (24,)
    seen = _lrs(optimizer, scheduler, 40)
    bias_lr = biases["initial_lr"]
    assert [lrs[2] for lrs in seen[:31:5]] == pytest.approx([bias_lr * (1 - s / 30) for s in range(0, 31, 5)])
    assert {lrs[2] for lrs in seen[30:]} == {0.0}
    assert [lrs[1] for lrs in seen] == pytest.approx([bias_lr * (1 - s / 80) for s in range(40)])
    assert [lrs[3] for lrs in seen] == pytest.approx([filters["initial_lr"] * (1 - s / 80) for s in range(40)])


def test_the_main_schedule_keeps_the_whitening_bias_among_the_biases() -> None:
    optimizer, _ = _whitening_run("main")
    assert len(optimizer.param_groups) == 3
    assert not any(group.get("decays_apart") for group in optimizer.param_groups)


def test_the_whitening_bias_schedule_survives_a_resume_and_a_re_plan() -> None:
    """A resumed run (restore_scheduler) continues the decay where it was; a time budget's re-plan
    (stretch_schedule) moves the main schedule's end but not the whitening bias's, set in epochs."""
    from cifar_cli.recipe.optim import restore_scheduler, stretch_schedule

    optimizer, scheduler = _whitening_run("decay")
    _lrs(optimizer, scheduler, 12)
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
    resumed_optimizer, resumed_scheduler = _whitening_run("decay")
    resumed_optimizer.load_state_dict(saved_optimizer)
    restore_scheduler(resumed_scheduler, saved_scheduler)
    resumed, continued = _lrs(resumed_optimizer, resumed_scheduler, 10), _lrs(optimizer, scheduler, 10)
    assert sum(resumed, []) == pytest.approx(sum(continued, []))
    assert stretch_schedule(scheduler, 22, 160)
    after = _lrs(optimizer, scheduler, 10)  # steps 22-31
    bias_lr = optimizer.param_groups[1]["initial_lr"]
    assert [lrs[2] for lrs in after] == pytest.approx([bias_lr * max(0, 1 - s / 30) for s in range(22, 32)])
    assert after[1][1] < after[0][1] and after[0][1] - after[1][1] == pytest.approx(bias_lr * (1 - 22 / 80) / 138)

"""Optimisers and learning-rate schedules built from the settings."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR, ReduceLROnPlateau

from cifar_cli.config.sections import OptimSettings, SchedulerSettings
from cifar_cli.recipe.muon import MuonSGD

Scheduler = LRScheduler | ReduceLROnPlateau


def build_optimizer(
    model: nn.Module,
    settings: OptimSettings,
    muon_dtype: torch.dtype = torch.bfloat16,
    decaying_apart: Sequence[nn.Parameter] = (),
) -> torch.optim.Optimizer:
    """Parameter groups: weights (`lr`, `weight_decay`) and normalisation/bias parameters (lr x `bias_lr_scale`,
    `bias_weight_decay`); with `muon`, the convolution filters form a third group that takes Muon steps, whose
    orthogonalisation multiplies matrices in `muon_dtype` (the run's autocast dtype, else fp32). Biases in
    `decaying_apart` (airbench's whitening bias, on the records' schedule) form a group of their own, marked
    `decays_apart`, whose lr build_scheduler decays on its own clock."""
    apart = {id(parameter) for parameter in decaying_apart}
    weights, biases, kept_apart, filters = [], [], [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in apart:
            kept_apart.append(parameter)
        elif parameter.ndim <= 1 or name.endswith(".bias"):
            biases.append(parameter)
        elif settings.name == "muon" and parameter.ndim == 4:
            filters.append(parameter)
        else:
            weights.append(parameter)
    bias_lr = settings.lr * settings.bias_lr_scale
    groups = [
        {"params": weights, "lr": settings.lr, "weight_decay": settings.weight_decay},
        {"params": biases, "lr": bias_lr, "weight_decay": settings.bias_weight_decay},
        {"params": kept_apart, "lr": bias_lr, "weight_decay": settings.bias_weight_decay, "decays_apart": True},
        {"params": filters, "lr": settings.muon_lr, "momentum": settings.muon_momentum, "use_muon": True},
    ]
    groups = [group for group in groups if group["params"]]
    if settings.name == "muon":
        return MuonSGD(
            groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov, matmul_dtype=muon_dtype
        )
    fused = use_fused_kernels(model)
    if settings.name == "sgd":
        return torch.optim.SGD(
            groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov, fused=fused
        )
    if settings.name == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, fused=fused)
    return torch.optim.Adam(groups, lr=settings.lr, betas=settings.betas, fused=fused)


def what_lr_reaches(settings: OptimSettings) -> str | None:
    """For a user who gave --lr: which parameters `optim.lr` steps and which settings move the others, in a recipe
    with several step sizes (`fast`'s Muon filters, biases at a multiple); None where it is the only one."""
    others = []
    if settings.bias_lr_scale != 1:
        others.append(f"biases and normalisation take {settings.bias_lr_scale:g}x it (optim.bias_lr_scale)")
    if settings.name == "muon":
        others.append(
            f"the convolution filters take Muon steps of optim.muon_lr ({settings.muon_lr:g}), which --lr does not "
            "change: --set optim.muon_lr=..."
        )
    if not others:
        return None
    reached = "the classifier head" if settings.name == "muon" else "the weights"
    return f"--lr {settings.lr:g} sets the step size of {reached}; " + "; ".join(others) + "."


def use_fused_kernels(model: nn.Module) -> bool:
    """Fused optimiser kernels (one pass over all parameters instead of a few ops per tensor) where torch has
    them for CPUs and CUDA GPUs (`cifar bench --profile` shows the optimiser's share of a step).
    Same state_dict layout, so checkpoints move freely between fused and unfused runs."""
    devices = {parameter.device.type for parameter in model.parameters()}
    return len(devices) == 1 and devices <= {"cpu", "cuda"}


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    settings: SchedulerSettings,
    epochs: int,
    steps_per_epoch: int,
    monitor_mode: str = "max",
    apart_epochs: float = 0.0,
) -> Scheduler | None:
    """Per-step schedules (cosine, linear, onecycle, warm-up) or the per-epoch plateau schedule; None for `none`
    without warm-up. A group marked `decays_apart` (build_optimizer) falls linearly to 0 over its first
    `apart_epochs` epochs instead, under a per-step schedule (settings.check_recipe refuses it beside the others).
    `scheduler_steps_per_batch` tells the loop which kind it got."""
    total_steps = max(1, epochs * steps_per_epoch)
    warmup_steps = round(settings.warmup_epochs * steps_per_epoch)
    if settings.name == "plateau":
        return ReduceLROnPlateau(optimizer, mode=monitor_mode, factor=settings.factor, patience=settings.patience)
    if settings.name == "onecycle":
        max_lrs = [group["lr"] for group in optimizer.param_groups]
        pct_start = warmup_steps / total_steps if warmup_steps else 0.25
        return OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total_steps, pct_start=min(pct_start, 0.9))
    decays_apart = [bool(group.get("decays_apart")) for group in optimizer.param_groups]
    if settings.name == "none" and not warmup_steps and not any(decays_apart):
        return None
    main = _StepSchedule(settings, warmup_steps, total_steps)
    apart = _DecayToZero(round(apart_epochs * steps_per_epoch))
    return LambdaLR(optimizer, [apart if own else main for own in decays_apart])


def restore_scheduler(scheduler: Scheduler, state: dict) -> None:
    """Restore the position in the schedule but keep its length from the current settings, so that a run resumed
    with more epochs stretches its schedule instead of ending at the old length."""
    state = dict(state)
    if "lr_lambdas" in state:  # keep the length built from the settings; take a re-plan's anchor, if any
        state["lr_lambdas"] = [
            {key: saved[key] for key in _StepSchedule.ANCHOR if key in saved} if isinstance(saved, dict) else None
            for saved in state["lr_lambdas"]
        ]
    if isinstance(scheduler, OneCycleLR):
        state["total_steps"] = scheduler.total_steps
        state.pop("_schedule_phases", None)
    scheduler.load_state_dict(state)


def stretch_schedule(scheduler: Scheduler | None, step: int, total_steps: int) -> bool:
    """Give a per-step schedule a new length from `step` on, continuing from the rate it has reached (no jump):
    True where it can (warm-up, constant, cosine, linear; the plateau schedule has no length), False for
    one-cycle, whose phases are fixed when it is made."""
    if isinstance(scheduler, OneCycleLR):
        return False
    if isinstance(scheduler, LambdaLR):
        for schedule in scheduler.lr_lambdas:
            schedule.retarget(step, total_steps)
    return True


def scheduler_steps_per_batch(scheduler: Scheduler | None) -> bool:
    return scheduler is not None and not isinstance(scheduler, ReduceLROnPlateau)


class _StepSchedule:
    """lr multiplier at a step: linear warm-up, then constant, cosine or linear decay to `final_lr_factor`.

    A plain class (not a lambda) so that the scheduler's state_dict stays plain data.
    """

    ANCHOR = ("anchor_step", "anchor_progress")  # where a re-planned length takes over (kept in checkpoints)

    def __init__(self, settings: SchedulerSettings, warmup_steps: int, total_steps: int) -> None:
        self.kind = settings.name
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.start, self.final = settings.warmup_start_factor, settings.final_lr_factor
        # Progress through the decay goes linearly from anchor_progress at anchor_step to 1 at total_steps.
        self.anchor_step, self.anchor_progress = warmup_steps, 0.0

    def progress(self, step: int) -> float:
        span = max(1, self.total_steps - self.anchor_step)
        return min(1.0, self.anchor_progress + (1 - self.anchor_progress) * (step - self.anchor_step) / span)

    def retarget(self, step: int, total_steps: int) -> None:
        """From `step` on, reach the end of the decay at `total_steps` instead, from the progress made so far."""
        if step > self.warmup_steps:
            self.anchor_step, self.anchor_progress = step, self.progress(step)
        self.total_steps = max(total_steps, step)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start + (1 - self.start) * step / self.warmup_steps
        if self.kind == "none":
            return 1.0
        progress = self.progress(step)
        if self.kind == "cosine":
            return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1 - (1 - self.final) * progress  # linear


class _DecayToZero:
    """lr multiplier falling linearly from 1 at step 0 to 0 at `steps`, then 0: airbench's whitening bias, whose
    length is set in epochs, so a re-planned run keeps it (retarget does nothing)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def retarget(self, step: int, total_steps: int) -> None:
        del step, total_steps

    def __call__(self, step: int) -> float:
        return max(0.0, 1 - step / self.steps) if self.steps > 0 else 0.0

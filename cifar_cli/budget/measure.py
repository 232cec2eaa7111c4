"""The plan of a run from speeds measured on this machine: the settings' recipe timed at its width (and at narrower
ones where a time budget needs them), then planned by budget/plan.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from cifar_cli.budget.plan import RunPlan, fit_budget
from cifar_cli.budget.probe import Calibration, measure_low_res_share, measure_speed
from cifar_cli.config.settings import Settings
from cifar_cli.data.loader import training_steps_per_epoch


def measure_plan(
    settings: Settings,
    stored: dict[str, Any] | None,
    device: torch.device,
    world_size: int,
    say: Callable[[str], None],
    elapsed_seconds: Callable[[], float],
    images: tuple[int, int, int],
    teacher_seconds_per_image: float = 0.0,
) -> RunPlan:
    """The plan of a run from speeds measured here: `images` are (train, per-epoch evaluation, test). A resumed
    run (`stored`: its checkpoint's settings) keeps its numerics, and a resumed budget run the epochs and width
    its last plan chose. A distilling run's steps carry the teacher's forward pass (seconds per image)."""
    train_images, val_images, test_images = images
    train = settings.train
    precision, channels_last = train.precision, train.channels_last
    if stored is not None:  # the same numerics as the epochs before
        precision = stored["train"]["precision"] if precision == "auto" else precision
        channels_last = stored["train"]["channels_last"] if channels_last == "auto" else channels_last

    small_epochs = train.low_res.epochs if train.low_res.applies(device.type, train.time_budget is not None) else 0
    if stored is not None and train.time_budget is not None and small_epochs:  # the small epochs its plan chose
        small_epochs = stored["train"].get("low_res", {}).get("epochs", 0)
    low_res = (small_epochs, train.low_res.size or 0)
    # A fine-tuning run trains the network its weights came from: no CPU budget's width or activation instead.
    own_network = train.time_budget is not None and train.init_from is None
    activation = settings.model.activation_for(device.type, own_network)
    if stored is not None:  # the activation its model was built with
        activation = stored["model"].get("activation")

    def calibrate_at(width: float) -> Calibration:
        model = settings.model.model_copy(update={"width_multiplier": width, "activation": activation})
        result = measure_speed(model, settings.optim, train.batch_size, device, precision, channels_last)
        result = replace(result, teacher_seconds_per_image=teacher_seconds_per_image)
        say(result.summary(train.precision) + (f" at width x{width:g}" if width != 1 else ""))
        return result

    def time_small(calibration: Calibration, width: float) -> Calibration:
        model = settings.model.model_copy(update={"width_multiplier": width, "activation": activation})
        result = measure_low_res_share(calibration, model, settings.optim, train.batch_size, device, low_res[1])
        say(result.describe_low_res(low_res[1]))
        return result

    steps = training_steps_per_epoch(train_images, train.batch_size, world_size)
    level, budget = train.tta_level(), train.time_budget
    if budget is not None and stored is None:
        fitted = fit_budget(
            budget,
            elapsed_seconds,
            calibrate_at,
            settings.model.width_for(device.type, budgeted=own_network),
            steps,
            train.batch_size,
            val_images,
            level,
            test_images,
            train.tta_share,
            low_res,
            time_small,
            settings.model.wider_budget_width(device.type) if own_network else None,
            narrower=own_network and not settings.model.is_torchvision,  # loaded or published: its own width
        )
        return replace(fitted, activation=activation)
    epochs, width = train.epochs, settings.model.width_multiplier
    if stored is not None and budget is not None:  # a resumed budget run keeps the plan it started with
        epochs, width = stored["train"]["epochs"], stored["model"]["width_multiplier"]
    calibration = calibrate_at(width)
    calibration = time_small(calibration, width) if small_epochs else calibration
    return RunPlan(
        epochs,
        width,
        train.batch_size,
        steps,
        val_images,
        level,
        calibration,
        budget,
        elapsed_seconds(),
        test_images,
        tta_share=train.tta_share,
        low_res_epochs=small_epochs,
        low_res_size=low_res[1],
        low_res_cost=calibration.low_res_share(low_res[1]) if small_epochs else 1.0,
        activation=activation,
    )

"""A name -> constructor table for models; every constructor takes the width multiplier and the class count, and
those registered with `activations` also an `activation` keyword (one of them)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cifar_cli.errors import UsageError
from cifar_cli.models.pretrained import architecture, is_torchvision
from cifar_cli.models.pretrained import build as build_torchvision

ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}
_FIXED_IMAGE_SIZE: dict[str, int] = {}  # models whose layers only fit one input size (pixels per side)
_ACTIVATIONS: dict[str, tuple[str, ...]] = {}  # models with a choice of activation function: the choices


def register_model(
    name: str, image_size: int | None = None, activations: tuple[str, ...] = ()
) -> Callable[[ModelBuilder], ModelBuilder]:
    """`image_size`: the one input size the model accepts; None for models that pool globally (any size >= 16).
    `activations`: the activation functions its builder accepts as `activation=` (none: its own, fixed)."""

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        _REGISTRY[name] = builder
        if image_size is not None:
            _FIXED_IMAGE_SIZE[name] = image_size
        if activations:
            _ACTIVATIONS[name] = activations
        return builder

    return decorate


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def fixed_image_size(name: str) -> int | None:
    return _FIXED_IMAGE_SIZE.get(name)


def require_model(name: str) -> None:
    """Refuse a model name that no module registered (nor torchvision has), naming the ones that are."""
    if is_torchvision(name):
        architecture(name)
    elif name not in _REGISTRY:
        raise UsageError(
            f"Unknown model {name!r}.",
            hint=f"Choose one of: {', '.join(available_models())}, or torchvision:NAME (e.g. torchvision:resnet18).",
        )


def build_model(
    name: str, width_multiplier: float = 1.0, num_classes: int = 10, activation: str | None = None
) -> nn.Module:
    """`activation`: None for the model's own; otherwise one of those it was registered with."""
    require_model(name)
    if is_torchvision(name):
        if width_multiplier != 1.0 or activation is not None:
            raise UsageError(
                f"{name} is torchvision's architecture as published: no width multiplier or activation choice.",
                hint="Leave model.width_multiplier at 1 and model.activation unset.",
            )
        return build_torchvision(name, num_classes)
    if activation is None:
        return _REGISTRY[name](width_multiplier, num_classes)
    choices = _ACTIVATIONS.get(name, ())
    if activation not in choices:
        unset = "Leave model.activation (and model.cpu_budget_activation) unset for this model."
        hint = f"Choose one of: {', '.join(choices)}." if choices else unset
        raise UsageError(f"Model {name!r} has no activation {activation!r}.", hint=hint)
    return _REGISTRY[name](width_multiplier, num_classes, activation=activation)


def build_model_for_measuring(
    name: str, width_multiplier: float = 1.0, num_classes: int = 10, images: int = 256, activation: str | None = None
) -> nn.Module:
    """A model for speed and FLOP measurements, never for training: its data-dependent start (airbench's whitening)
    taken from `images` random images, in fp32 outside autocast as training takes it from real ones."""
    model = build_model(name, width_multiplier, num_classes, activation)
    init = getattr(model, "init_from_data", None)
    if init is not None:
        init(torch.randn(images, 3, 32, 32))
    return model

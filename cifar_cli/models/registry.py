"""A name -> constructor table for models; every constructor takes the width multiplier."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from cifar_cli.errors import UsageError

ModelBuilder = Callable[[float], nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def decorate(builder: ModelBuilder) -> ModelBuilder:
        _REGISTRY[name] = builder
        return builder

    return decorate


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, width_multiplier: float = 1.0) -> nn.Module:
    if name not in _REGISTRY:
        raise UsageError(f"Unknown model {name!r}.", hint=f"Choose one of: {', '.join(available_models())}.")
    return _REGISTRY[name](width_multiplier)

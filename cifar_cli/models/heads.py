"""Where a classifier's class scores come from: the layer that fine-tuning and pretrained weights make new."""

from __future__ import annotations

from torch import nn

from cifar_cli.errors import UsageError


def head_name(model: nn.Module) -> str:
    """The module that maps features to class scores: the model's last linear layer."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise UsageError(f"{type(model).__name__} has no linear head to replace.")
    return linear[-1]

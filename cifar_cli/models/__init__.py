"""Models by name. Adding one is one decorated function in any module imported here."""

from cifar_cli.models import airbench, resnet, seed_cnn  # noqa: F401  (importing registers them)
from cifar_cli.models.registry import (
    available_models,
    build_model,
    build_model_for_measuring,
    fixed_image_size,
    require_model,
)

__all__ = ["available_models", "build_model", "build_model_for_measuring", "fixed_image_size", "require_model"]

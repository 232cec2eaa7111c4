"""What a prepared data set is, for every layer downstream: its classes, image size and normalisation.

It comes from the manifest `cifar prepare` writes, travels inside every checkpoint and export, and is what models,
metrics, displays and plots read instead of CIFAR-10 constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# CIFAR-10's published per-channel statistics (0..1 scale): only for data prepared before statistics were stored.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASS_NAMES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
STATISTICS_CHUNK_VALUES = 12_500_000  # pixel values per pass when computing statistics: a 100 MB float64 copy


@dataclass(frozen=True)
class DataSpec:
    """Classes in label order; square images of `image_size` pixels; mean and std per RGB channel on 0..1."""

    class_names: tuple[str, ...]
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    image_size: int = 32
    dataset: str = "cifar10"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "class_names": list(self.class_names),
            "mean": list(self.mean),
            "std": list(self.std),
            "image_size": self.image_size,
        }

    @classmethod
    def from_dict(cls, stored: dict[str, Any] | None) -> DataSpec:
        """From a manifest or a checkpoint; what older ones lack is CIFAR-10's (all they could hold)."""
        stored = stored or {}
        return cls(
            class_names=tuple(stored.get("class_names") or CIFAR10_CLASS_NAMES),
            mean=_triple(stored.get("mean"), CIFAR10_MEAN),
            std=_triple(stored.get("std"), CIFAR10_STD),
            image_size=int(stored.get("image_size") or 32),
            dataset=str(stored.get("dataset") or "cifar10"),
        )


CIFAR10_SPEC = DataSpec(CIFAR10_CLASS_NAMES)


def _triple(values: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if not values or len(values) != 3:
        return default
    return (float(values[0]), float(values[1]), float(values[2]))


def channel_statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation (population) of uint8 N x 3 x H x W images, on the 0..1 scale."""
    count = images.shape[0] * images.shape[2] * images.shape[3]
    if count == 0:
        return CIFAR10_MEAN, CIFAR10_STD
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    per_pass = max(1, STATISTICS_CHUNK_VALUES // max(1, images[0].numel()))  # images, whatever their size
    for start in range(0, images.shape[0], per_pass):
        chunk = images[start : start + per_pass].to(torch.float64) / 255
        total += chunk.sum(dim=(0, 2, 3))
        squares += (chunk * chunk).sum(dim=(0, 2, 3))
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)

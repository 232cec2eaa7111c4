"""The seed project's network: three 3x3 conv + ReLU + max-pool stages and a two-layer classifier."""

from __future__ import annotations

from torch import nn

from cifar_cli.models.registry import register_model


def _stage(in_channels: int, out_channels: int) -> nn.Sequential:
    # Pooling before the ReLU computes the same function as the seed's conv, ReLU, pool (max and ReLU commute),
    # with the ReLU and its backward on a quarter of the values. Parameter names are unchanged.
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(inplace=True))


@register_model("seed-cnn", image_size=32)  # the flattening layer is sized for 4 x 4 maps of a 32 x 32 input
def seed_cnn(width_multiplier: float = 1.0, num_classes: int = 10) -> nn.Module:
    widths = [max(1, round(w * width_multiplier)) for w in (32, 64, 128)]
    hidden = max(1, round(256 * width_multiplier))
    return nn.Sequential(
        _stage(3, widths[0]),  # 32x32 -> 16x16
        _stage(widths[0], widths[1]),  # -> 8x8
        _stage(widths[1], widths[2]),  # -> 4x4
        nn.Flatten(),
        nn.Linear(widths[2] * 4 * 4, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(hidden, num_classes),
    )

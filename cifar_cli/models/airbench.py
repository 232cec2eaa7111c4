"""airbench-class networks (after Keller Jordan's cifar10-airbench), written for this project.

A frozen 2x2 convolution whitens the input patches (its filters come from the eigenvectors of the training patches'
covariance), then three groups of (conv, max-pool, BatchNorm, GELU, conv, BatchNorm, GELU), a global max-pool and a
linear head whose logits are scaled by 1/9. `activation="silu"` puts SiLU in the groups instead of GELU, as hiverge's
record has it (the whitening's activation stays GELU, there too). Three sizes, the rungs of the recipe ladder
(presets fast, balanced, accurate):
- `airbench` (airbench94 class): widths 64/256/256, two convolutions per group;
- `airbench-wide` (airbench95 class): widths 128/384/384, about 2.5x the multiply-adds;
- `airbench-deep` (airbench96 class): widths 128/384/512 and a third convolution per group, added back onto the
  group's first activation (a residual), about 3.8x the multiply-adds.
"""

from __future__ import annotations

import torch
from torch import nn

from cifar_cli.models.registry import register_model

WHITEN_KERNEL = 2  # pixels
WHITEN_WIDTH = 2 * 3 * WHITEN_KERNEL**2  # each eigenvector and its negative
LOGIT_SCALE = 1 / 9
ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale stays 1 (only the bias learns); fast-moving statistics as in airbench."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class ConvGroup(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, depth: int = 2, activation: str = "gelu") -> None:
        super().__init__()
        self.conv1 = _conv(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = FrozenScaleBatchNorm(out_channels)
        self.conv2 = _conv(out_channels, out_channels)
        self.norm2 = FrozenScaleBatchNorm(out_channels)
        self.third = depth == 3
        if self.third:
            self.conv3 = _conv(out_channels, out_channels)
            self.norm3 = FrozenScaleBatchNorm(out_channels)
        self.activation = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.norm1(self.pool(self.conv1(x))))
        y = self.activation(self.norm2(self.conv2(x)))
        if not self.third:
            return y
        return self.activation(self.norm3(self.conv3(y)) + x)


def _conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    # Partial identity start: the first in_channels filters pass their input through (airbench's dirac init).
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(in_channels, out_channels)])
    return conv


class AirbenchNet(nn.Module):
    def __init__(
        self,
        width_multiplier: float = 1.0,
        num_classes: int = 10,
        base_widths: tuple[int, int, int] = (64, 256, 256),
        depth: int = 2,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        widths = [max(8, round(w * width_multiplier)) for w in base_widths]
        self.whiten = nn.Conv2d(3, WHITEN_WIDTH, WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.groups = nn.Sequential(
            ConvGroup(WHITEN_WIDTH, widths[0], depth, activation),
            ConvGroup(widths[0], widths[1], depth, activation),
            ConvGroup(widths[1], widths[2], depth, activation),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.activation = nn.GELU()
        self.whiten_bias_trainable = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.whiten.bias if self.whiten_bias_trainable else self.whiten.bias.detach()
        x = self.activation(nn.functional.conv2d(x, self.whiten.weight, bias))
        x = self.pool(self.groups(x)).flatten(1)
        return self.head(x) * LOGIT_SCALE

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalised float32 training images (N x 3 x 32 x 32).

        Runs in float32 outside autocast on purpose: an eigendecomposition in bf16 ruins the first layer.
        """
        patches = images.float().unfold(2, WHITEN_KERNEL, 1).unfold(3, WHITEN_KERNEL, 1)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * WHITEN_KERNEL**2).double()
        covariance = torch.cov(patches.T)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps).view(-1, 1)).flip(0)
        filters = filters.view(-1, 3, WHITEN_KERNEL, WHITEN_KERNEL).to(self.whiten.weight)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))


@register_model("airbench", activations=tuple(ACTIVATIONS))
def airbench(width_multiplier: float = 1.0, num_classes: int = 10, activation: str = "gelu") -> nn.Module:
    return AirbenchNet(width_multiplier, num_classes, activation=activation)


@register_model("airbench-wide", activations=tuple(ACTIVATIONS))
def airbench_wide(width_multiplier: float = 1.0, num_classes: int = 10, activation: str = "gelu") -> nn.Module:
    return AirbenchNet(width_multiplier, num_classes, base_widths=(128, 384, 384), activation=activation)


@register_model("airbench-deep", activations=tuple(ACTIVATIONS))
def airbench_deep(width_multiplier: float = 1.0, num_classes: int = 10, activation: str = "gelu") -> nn.Module:
    return AirbenchNet(width_multiplier, num_classes, base_widths=(128, 384, 512), depth=3, activation=activation)

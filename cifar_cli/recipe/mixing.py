"""Mixup and CutMix on whole training batches: each image is mixed with its partner in the batch turned round
(the last image with the first), and its target becomes the same mix of the two labels, as soft targets for the
loss (which applies label smoothing on top: torch's cross-entropy takes probabilities).

Mixup: pixels lam x image + (1 - lam) x partner, lam ~ Beta(alpha, alpha). CutMix: a box of the partner pasted in,
of area (1 - lam) of the image before clipping at the border; lam is then the share of the image's own pixels.
Draws come from torch's global generator, seeded by train.seed and saved in every checkpoint, so that a resumed run
mixes as the uninterrupted one would.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional

from cifar_cli.config.sections import AugmentSettings


class BatchMixer:
    def __init__(self, augment: AugmentSettings, num_classes: int) -> None:
        self.mixup, self.cutmix = augment.mixup, augment.cutmix
        self.probability, self.cutmix_share = augment.mix_probability, augment.cutmix_share
        self.num_classes = num_classes

    @classmethod
    def from_settings(cls, augment: AugmentSettings, num_classes: int) -> BatchMixer | None:
        return cls(augment, num_classes) if augment.mixup > 0 or augment.cutmix > 0 else None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed images, soft targets N x classes that sum to one per image)."""
        soft = functional.one_hot(targets, self.num_classes).float()
        if float(torch.rand(())) >= self.probability:
            return images, soft
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or float(torch.rand(())) < self.cutmix_share)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        partner = images.flip(0)
        if use_cutmix:
            images, lam = paste_box(images, partner, lam)
        else:
            images = images.lerp(partner, 1.0 - lam)
        return images, soft.lerp(soft.flip(0), 1.0 - lam)


def paste_box(images: torch.Tensor, partner: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """`images` with one box (the same for the batch) of `partner` pasted in; returns them and the share of each
    image's own pixels left."""
    height, width = images.shape[-2:]
    box_h, box_w = round(height * math.sqrt(1.0 - lam)), round(width * math.sqrt(1.0 - lam))
    centre_y, centre_x = int(torch.randint(height, ())), int(torch.randint(width, ()))
    top, bottom = max(centre_y - box_h // 2, 0), min(centre_y + box_h - box_h // 2, height)
    left, right = max(centre_x - box_w // 2, 0), min(centre_x + box_w - box_w // 2, width)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
    return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)

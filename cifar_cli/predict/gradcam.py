"""Grad-CAM (Selvaraju et al., 2017): where in an image the evidence for a class lies, from the last convolution.

The gradient of the class score with respect to the last convolution's output, averaged over each channel's map,
weights that channel; the weighted sum of the maps, clipped at zero and scaled to [0, 1], is the heat map. The
overlay drawn here uses Pillow only (the core draws no matplotlib figures); `cifar plot` makes its own figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from cifar_cli.data.loader import normalize
from cifar_cli.data.spec import DataSpec
from cifar_cli.errors import UsageError
from cifar_cli.files import write_atomically

OVERLAY_SCALE = 4  # a 32-pixel image is drawn 128 pixels wide
CAPTION_HEIGHT = 14  # pixels of the caption strip under an overlay


def last_convolution(model: nn.Module) -> nn.Conv2d:
    convolutions = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    if not convolutions:
        raise UsageError(f"{type(model).__name__} has no convolution to explain.")
    return convolutions[-1]


def gradcam(model: nn.Module, images: torch.Tensor, spec: DataSpec, classes: torch.Tensor) -> torch.Tensor:
    """Heat maps (float32 N x S x S in [0, 1], on the CPU) of `classes` (int64 N) for uint8 N x 3 x S x S images,
    computed in fp32 without test-time augmentation."""
    device = next(model.parameters()).device
    layer = last_convolution(model)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            batch = normalize(images.to(device), torch.float32, False, spec).requires_grad_(True)
            logits = model(batch).float()
            score = logits.gather(1, classes.to(device)[:, None]).sum()
            (gradient,) = torch.autograd.grad(score, captured[-1])
    finally:
        handle.remove()
        model.train(was_training)
    activation = captured[-1].detach().float()
    weights = gradient.float().mean(dim=(2, 3), keepdim=True)
    heat = torch.relu((weights * activation).sum(dim=1, keepdim=True))
    heat = nn.functional.interpolate(heat, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = heat.flatten(1).amax(dim=1).clamp(min=1e-12)[:, None, None]
    return (heat / peak).cpu()


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """A float map in [0, 1] as uint8 RGB, dark blue (0) through green and yellow to red (1): the jet-like ramp
    heat maps are usually drawn with, as piecewise-linear channels."""
    red = np.clip(1.5 - np.abs(4 * heat - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * heat - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * heat - 1), 0, 1)
    return (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)


def overlay_image(image: torch.Tensor, heat: torch.Tensor, caption: str) -> Image.Image:
    """The image and the image under its heat map, side by side and enlarged, with a caption strip beneath."""
    side = image.shape[-1] * OVERLAY_SCALE
    picture = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((side, side), Image.Resampling.NEAREST)
    colours = Image.fromarray(heat_colours(heat.numpy())).resize((side, side), Image.Resampling.BILINEAR)
    blended = Image.blend(picture, colours, alpha=0.45)
    canvas = Image.new("RGB", (2 * side, side + CAPTION_HEIGHT), "white")
    canvas.paste(picture, (0, 0))
    canvas.paste(blended, (side, 0))
    ImageDraw.Draw(canvas).text((3, side + 1), caption, fill="black")
    return canvas


def write_overlay(path: Path, image: torch.Tensor, heat: torch.Tensor, caption: str) -> Path:
    import io

    buffer = io.BytesIO()
    overlay_image(image, heat, caption).save(buffer, format="PNG")
    write_atomically(path, buffer.getvalue())
    return path

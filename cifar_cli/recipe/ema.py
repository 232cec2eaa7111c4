"""An exponential moving average (EMA) of the weights, kept beside the trained ones (timm's --model-ema, Keras'
use_ema): evaluated each epoch, scored at the end, saved as the checkpoint's `ema_state`, and what `evaluate`,
`predict`, `export` and `calibrate` load.

After every optimiser step from `start_step` on: average <- decay * average + (1 - decay) * weights. Before it, the
average follows the weights exactly, so that it starts from trained weights, not from the random ones. BatchNorm's
running statistics are averaged with the same decay (as timm and torch's AveragedModel(use_buffers=True) do): the
statistics then describe activations of weights close to the averaged ones; integer buffers (the batch counter) are
copied. Lookahead, set too, still moves the trained weights; the average is what is evaluated and kept.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float, start_step: int = 0) -> None:
        self.module = copy.deepcopy(model).eval()  # the averaged network, on the model's device and layout
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay, self.start_step = decay, start_step

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the weights after optimiser step `step` (1-based) into the average."""
        weight = 1.0 if step <= self.start_step else 1.0 - self.decay
        averaged = self.module.state_dict()
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                averaged[name].lerp_(tensor, weight)
            else:
                averaged[name].copy_(tensor)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

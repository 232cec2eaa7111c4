"""Lookahead weight averaging as airbench uses it: every 5 steps the weights move to a running average of
themselves, with an averaging strength that grows as the cube of training progress; the last step hands back the
average. Early on it does nothing (decay ~0); near the end it smooths the noise of the final, low-lr steps."""

from __future__ import annotations

import torch
from torch import nn

SYNC_EVERY = 5  # optimiser steps between syncs
MAX_DECAY = 0.95**SYNC_EVERY  # averaging strength at the end of training


class Lookahead:
    def __init__(self, model: nn.Module) -> None:
        self.average = {
            name: tensor.detach().clone() for name, tensor in model.state_dict().items() if tensor.is_floating_point()
        }

    @staticmethod
    def decay(step: int, total_steps: int) -> float:
        return MAX_DECAY * (step / max(1, total_steps)) ** 3

    @torch.no_grad()
    def sync(self, model: nn.Module, decay: float) -> None:
        """average <- decay * average + (1 - decay) * weights; weights <- average (BatchNorm statistics too)."""
        state = model.state_dict()
        for name, average in self.average.items():
            average.lerp_(state[name], 1 - decay)
            state[name].copy_(average)

    def maybe_sync(self, model: nn.Module, step: int, total_steps: int) -> None:
        if step % SYNC_EVERY == 0:
            self.sync(model, self.decay(step, total_steps))

    def finish(self, model: nn.Module) -> None:
        """Hand the averaged weights back to the model (decay 1: the average as it stands)."""
        self.sync(model, 1.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.average

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, tensor in state.items():
            self.average[name].copy_(tensor)

"""Fine-tuning: a run that starts from a trained checkpoint's weights instead of a fresh initialisation.

Where the checkpoint's classes are the data's (same names, same order) every weight is loaded. Where they differ,
the head (the model's last linear layer) is made new for the data's classes and the rest is loaded, shapes checked.
The body can be frozen for the first epochs, so that the large gradients of a random head do not wreck the features
the body learned (the two stages of fastai's `fine_tune`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_cli.budget.plan import count
from cifar_cli.checkpoint import kept_weights, load_checkpoint
from cifar_cli.config.sections import ModelSettings
from cifar_cli.data.spec import DataSpec
from cifar_cli.errors import UsageError
from cifar_cli.models import build_model
from cifar_cli.models.heads import head_name
from cifar_cli.predict.exported_model import EXPORTED_SUFFIXES
from cifar_cli.predict.inference import checkpoint_spec

SHOWN_PROBLEMS = 4  # mismatched weights named in an error; the rest are counted


@dataclass(frozen=True)
class Source:
    """The checkpoint a run starts from."""

    path: Path
    state: dict[str, Any]
    model_name: str
    width_multiplier: float
    spec: DataSpec  # its classes, and the input statistics its weights were trained with
    activation: str | None = None  # model.activation it was trained with (None: the model's own)

    def record(self, head: str) -> dict[str, Any]:
        """What the run stores about where it started: the file, its run, epoch and model, and whether the head
        was loaded or made new."""
        return {
            "checkpoint": str(self.path),
            "run_name": self.state.get("run_name"),
            "epoch": self.state.get("epoch"),
            "model": self.model_name,
            "classes": self.spec.num_classes,
            "head": head,
        }


def read_source(path: Path) -> Source:
    """A checkpoint written by `cifar train`; an export has no training state to start from and is refused."""
    if path.suffix in EXPORTED_SUFFIXES:
        raise UsageError(
            f"{path} is an exported model: training starts from a checkpoint.",
            hint="Pass the run's last.pth or best.pth (in checkpoint_dir/<run>/).",
        )
    state = load_checkpoint(path, map_location="cpu")
    model = state.get("settings", {}).get("model", {})
    width, activation = float(model.get("width_multiplier", 1.0)), model.get("activation")
    return Source(path, state, state["model_name"], width, checkpoint_spec(state), activation)


def match_source(source: Source, model: ModelSettings, class_names: list[str] | tuple[str, ...]) -> None:
    """Weights fit only the network they were trained in: another model, width, activation or shape is refused
    before any measurement or training (a throwaway model on the CPU is checked against the file). A run that
    names no activation takes the source's (a CPU budget's SiLU, say)."""
    if model.activation is None:
        model.activation = source.activation
    if source.activation != model.activation:
        raise UsageError(
            f"{source.path} holds model {source.model_name} with activation {source.activation or 'its own'}; "
            f"this run trains {model.activation}.",
            hint="Leave model.activation unset: a fine-tuning run takes its source's.",
        )
    if source.model_name != model.name:
        raise UsageError(
            f"{source.path} holds model {source.model_name}; this run trains model {model.name}.",
            hint=f"Add --model {source.model_name} (or the preset it was trained with), or start from a "
            f"checkpoint of {model.name}.",
        )
    if source.width_multiplier != model.width_multiplier:
        raise UsageError(
            f"{source.path} holds model {source.model_name} at width x{source.width_multiplier:g}; this run "
            f"trains width x{model.width_multiplier:g}.",
            hint=f"Add --set model.width_multiplier={source.width_multiplier:g}.",
        )
    _loadable(build_model(model.name, model.width_multiplier, len(class_names), model.activation), source, class_names)


def load_weights(model: nn.Module, source: Source, class_names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Load `source` into `model` (a new head where the classes differ); returns the record of what was loaded."""
    loadable = _loadable(model, source, class_names)
    model.load_state_dict(loadable, strict=False)
    return source.record("loaded" if len(loadable) == len(model.state_dict()) else "new")


def _loadable(model: nn.Module, source: Source, class_names: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of `source` that `model` takes: all, or all but the head's where the classes differ. Any other
    missing, extra or differently shaped tensor is an error that names them."""
    head = head_name(model)
    incoming: dict[str, torch.Tensor] = kept_weights(source.state)
    own = model.state_dict()
    same_classes = list(source.spec.class_names) == list(class_names)
    replaced = set() if same_classes else {key for key in own if key.startswith(head + ".")}
    problems = [_mismatch(key, incoming.get(key), tensor) for key, tensor in own.items() if key not in replaced]
    problems = [problem for problem in problems if problem]
    problems += [f"{key}: not in this model" for key in sorted(set(incoming) - set(own) - replaced)]
    if problems:
        more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise UsageError(
            f"The weights in {source.path} do not fit this {source.model_name}: "
            f"{'; '.join(problems[:SHOWN_PROBLEMS])}{more}.",
            hint="Start from a checkpoint of the same model, trained by this version of cifar.",
        )
    return {key: value for key, value in incoming.items() if key not in replaced}


def _mismatch(key: str, incoming: torch.Tensor | None, own: torch.Tensor) -> str | None:
    if incoming is None:
        return f"{key}: missing"
    if tuple(incoming.shape) != tuple(own.shape):
        return f"{key}: {tuple(incoming.shape)} in the file, {tuple(own.shape)} here"
    return None


def describe_start(record: dict[str, Any], freeze_epochs: int) -> str:
    head = "all weights loaded" if record["head"] == "loaded" else "a new head for this data's classes"
    frozen = f"; the body frozen for the first {count(freeze_epochs, 'epoch')}" if freeze_epochs else ""
    if "weights" in record:  # a torchvision model's pretrained weights (models/pretrained.py)
        return f"Starting from the weights {record['weights']} ({record['model']}): {head}{frozen}."
    return (
        f"Starting from {record['checkpoint']} (run {record['run_name']}, epoch {record['epoch']}, "
        f"{record['model']}, {record['classes']} classes): {head}{frozen}."
    )


class BodyFreezer:
    """Trains only the head for the first `epochs` epochs. One process: the body stops requiring gradients (its
    backward pass is skipped). Under DistributedDataParallel, whose gradient hooks are fixed when it wraps the model,
    the body's gradients are dropped after each backward instead, so every rank still takes part in every reduce."""

    def __init__(self, model: nn.Module, epochs: int, distributed: bool) -> None:
        head = head_name(model) + "."
        self.body = [p for name, p in model.named_parameters() if not name.startswith(head) and p.requires_grad]
        self.epochs, self.distributed = epochs, distributed
        self.frozen = False

    def set_epoch(self, finished_epochs: int) -> None:
        self.frozen = finished_epochs < self.epochs
        if not self.distributed:
            for parameter in self.body:
                parameter.requires_grad_(not self.frozen)

    def after_backward(self) -> None:
        if self.frozen and self.distributed:
            for parameter in self.body:
                parameter.grad = None

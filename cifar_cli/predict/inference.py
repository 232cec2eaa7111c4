"""A trained model in memory: rebuilt from a checkpoint, run over a loader with optional test-time augmentation,
checked against the data it is asked to score, and pointed at the data it was trained on."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from cifar_cli.checkpoint import kept_weights, load_checkpoint
from cifar_cli.config.sections import DataSettings, ModelSettings, TrainSettings
from cifar_cli.data.loader import BatchLoader
from cifar_cli.data.prepare import read_spec
from cifar_cli.data.spec import DataSpec
from cifar_cli.errors import UsageError
from cifar_cli.models import build_model
from cifar_cli.predict.exported_model import EXPORTED_SUFFIXES, load_exported
from cifar_cli.runtime.device import Precision


def tta_logits(model: nn.Module, images: torch.Tensor, level: int) -> torch.Tensor:
    """Level 0: plain; 1: average with the mirror image; 2: also one-pixel shifts (for models trained with translate).

    Weights as in airbench: half on the unshifted view, a quarter on each shifted view.
    """

    def with_flip(batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch)
        return logits if level == 0 else 0.5 * (logits + model(batch.flip(3)))

    logits = with_flip(images)
    if level < 2:
        return logits
    padded = nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
    up_left = padded[:, :, :-2, :-2].contiguous(memory_format=_memory_format(images))
    down_right = padded[:, :, 2:, 2:].contiguous(memory_format=_memory_format(images))
    return 0.5 * logits + 0.25 * with_flip(up_left) + 0.25 * with_flip(down_right)


def _memory_format(images: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


@dataclass(frozen=True)
class Predictions:
    logits: torch.Tensor  # float32, N x classes, on the CPU
    targets: torch.Tensor  # int64, N
    loss: float  # mean cross-entropy without label smoothing

    @property
    def predicted(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: BatchLoader,
    precision: Precision,
    device: torch.device,
    tta_level: int = 0,
    tta_share: float = 1.0,
) -> Predictions:
    """The model's logits for every image of `loader`, with test-time augmentation at `tta_level`. Selective TTA
    (`tta_share` < 1): one plain pass over all images, then the full TTA only for that share of them, the ones the
    plain pass is least sure of (lowest top softmax probability): 1 + 6 x share passes per image instead of 6."""
    was_training = model.training
    model.eval()
    try:
        if tta_level == 0 or tta_share >= 1:
            logits, targets = _scored(loader, precision, device, lambda images: tta_logits(model, images, tta_level))
        else:
            logits, targets = _scored(loader, precision, device, model)
            logits = _augment_least_sure(model, loader, precision, device, logits, tta_level, tta_share)
    finally:
        model.train(was_training)
    loss = float(nn.functional.cross_entropy(logits, targets))
    return Predictions(logits.cpu(), targets.cpu(), loss)


def _scored(
    loader: BatchLoader, precision: Precision, device: torch.device, score: Callable
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float logits, targets) of every batch of `loader` under `score`."""
    logits_parts, target_parts = [], []
    for images, targets in loader:
        with precision.autocast(device):
            logits_parts.append(score(images).float())
        target_parts.append(targets)
    return torch.cat(logits_parts), torch.cat(target_parts)


def _augment_least_sure(
    model: nn.Module,
    loader: BatchLoader,
    precision: Precision,
    device: torch.device,
    plain: torch.Tensor,
    level: int,
    share: float,
) -> torch.Tensor:
    """`plain` logits with the `share` of images it is least sure of replaced by their TTA logits at `level`."""
    count = math.ceil(share * len(plain))
    chosen = torch.zeros(len(plain), dtype=torch.bool, device=plain.device)
    if count:
        chosen[plain.softmax(dim=1).amax(dim=1).topk(count, largest=False).indices] = True
    logits, start = plain.clone(), 0
    for images, _ in loader:  # the evaluation order is fixed: batch by batch, the same images as the plain pass
        rows = chosen[start : start + len(images)]
        if rows.any():
            with precision.autocast(device):
                logits[start : start + len(images)][rows] = tta_logits(
                    model, images[rows].contiguous(memory_format=_memory_format(images)), level
                ).float()
        start += len(images)
    return logits


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    state: dict[str, Any]
    train_settings: TrainSettings
    data_settings: DataSettings
    spec: DataSpec  # the classes, image size and statistics it was trained with


def load_model(checkpoint: Path, device: torch.device) -> LoadedModel:
    """Rebuild the model from the settings stored in a checkpoint; nothing in the file is executed."""
    state = load_checkpoint(checkpoint, map_location="cpu")
    stored = state["settings"]
    try:
        model_settings = ModelSettings.model_validate(stored["model"])
        train_settings = TrainSettings.model_validate(stored["train"])
        data_settings = DataSettings.model_validate(stored["data"])
    except (KeyError, TypeError, ValidationError) as error:
        raise UsageError(f"{checkpoint} has damaged settings ({type(error).__name__}).") from None
    spec = checkpoint_spec(state)
    model = build_model(
        model_settings.name, model_settings.width_multiplier, spec.num_classes, model_settings.activation
    )
    try:
        model.load_state_dict(kept_weights(state))
    except (RuntimeError, TypeError, AttributeError) as error:
        raise UsageError(
            f"{checkpoint}: the weights do not fit model {model_settings.name!r} ({str(error)[:200]})."
        ) from None
    model = model.to(
        device, memory_format=torch.channels_last if train_settings.channels_last else torch.contiguous_format
    )
    return LoadedModel(model.eval(), state, train_settings, data_settings, spec)


def checkpoint_spec(state: dict[str, Any]) -> DataSpec:
    """What a checkpoint was trained on (older ones stored only class names: CIFAR-10's statistics)."""
    stored = state.get("data_spec") or {"class_names": state.get("class_names")}
    return DataSpec.from_dict(stored)


def check_same_classes(
    model_classes: list[str] | tuple[str, ...], model_size: int, data: DataSettings, origin: Path
) -> None:
    """A model scores only data with its own classes, in its own order, at its own size: anything else is refused."""
    prepared = read_spec(data.processed_dir)
    if list(prepared.class_names) != list(model_classes):
        raise UsageError(
            f"{origin} was trained on {len(model_classes)} classes ({_first_names(model_classes)}); the data in "
            f"{data.processed_dir} has {prepared.num_classes} ({_first_names(prepared.class_names)}).",
            hint="Pass the --processed-dir the model was trained on.",
        )
    if prepared.image_size != model_size:
        raise UsageError(
            f"{origin} takes {model_size} x {model_size} images; the data in {data.processed_dir} is "
            f"{prepared.image_size} x {prepared.image_size}.",
            hint="Pass the --processed-dir the model was trained on.",
        )


def _first_names(names: list[str] | tuple[str, ...], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def recorded_data(checkpoint: Path) -> dict[str, Any] | None:
    """The data settings a checkpoint (or an export's contract) records, or None where it records none."""
    if checkpoint.suffix in EXPORTED_SUFFIXES:
        recorded = load_exported(checkpoint).contract.get("data")
    else:
        recorded = load_checkpoint(checkpoint, map_location="cpu").get("settings", {}).get("data")
    return recorded if isinstance(recorded, dict) else None


def checkpoint_data(checkpoint: Path, data: DataSettings, keep: set[str] = frozenset()) -> DataSettings:
    """The data to score `checkpoint` on: the data it was trained on (its folders, data set and label set), except
    the settings in `keep` (named on the command line) and paths that the settings files or environment set away
    from the defaults: those win. A checkpoint that records nothing readable keeps `data` as it is."""
    recorded = recorded_data(checkpoint)
    if recorded is None:
        return data
    try:
        trained_on = DataSettings.model_validate(recorded)
    except ValidationError:
        return data
    defaults = DataSettings()
    chosen_now = set(keep) | {
        name for name in ("processed_dir", "raw_data_dir") if getattr(data, name) != getattr(defaults, name)
    }
    return trained_on.model_copy(update={name: getattr(data, name) for name in chosen_now})

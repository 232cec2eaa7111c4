"""What a run needs before its first step: the device, the data splits, the loaders, the model and its optimiser."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar_cli.config.sections import DataSettings, ModelSettings, TrainSettings
from cifar_cli.config.settings import Settings
from cifar_cli.data.loader import Augment, BatchLoader, normalize, stratified_split
from cifar_cli.data.prepare import load_cache, read_spec
from cifar_cli.data.spec import DataSpec
from cifar_cli.errors import UsageError
from cifar_cli.models import build_model, fixed_image_size
from cifar_cli.models.pretrained import Pretrained, is_torchvision
from cifar_cli.models.pretrained import statistics as pretrained_statistics
from cifar_cli.recipe.distill import DistillationLoss
from cifar_cli.recipe.ema import WeightAverage
from cifar_cli.recipe.lookahead import Lookahead
from cifar_cli.recipe.optim import Scheduler, build_optimizer, build_scheduler
from cifar_cli.runtime.device import Precision, resolve_device
from cifar_cli.runtime.distributed import DistContext
from cifar_cli.runtime.memory import keep_freed_memory
from cifar_cli.train.finetune import BodyFreezer, Source, load_weights

WHITENING_SAMPLE = 5000  # training images used to estimate the whitening filters
Split = tuple[torch.Tensor, torch.Tensor]  # uint8 images N x 3 x H x W, int64 labels N


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def setup_device(train: TrainSettings, context: DistContext) -> torch.device:
    """The device of this process (its own GPU under DDP), its CPU threads and allocator setting."""
    device = resolve_device(train.device)
    if context.enabled and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    if train.num_threads:
        torch.set_num_threads(train.num_threads)
    if train.keep_freed_memory:
        keep_freed_memory(device.type)
    return device


def data_spec(
    data: DataSettings, model_name: str, trained: DataSpec | None = None, pretrained: bool = False
) -> DataSpec:
    """The prepared data's classes, size and statistics; a model made for one input size refuses others. A resumed
    run keeps the statistics its weights were trained with (`trained`); a torchvision model's pretrained weights
    take the statistics they were trained with (`pretrained`)."""
    spec = read_spec(data.processed_dir)
    if trained is not None:
        spec = replace(spec, mean=trained.mean, std=trained.std)
    elif pretrained:
        if not is_torchvision(model_name):
            raise UsageError(
                f"--weights (model.weights) starts torchvision:NAME models; {model_name} is this tool's own.",
                hint="Start it from one of your checkpoints with --init-from, or choose --model torchvision:NAME.",
            )
        mean, std = pretrained_statistics(model_name)
        spec = replace(spec, mean=mean, std=std)
    fixed = fixed_image_size(model_name)
    if fixed is not None and spec.image_size != fixed:
        raise UsageError(
            f"Model {model_name} takes {fixed} x {fixed} images; the data in {data.processed_dir} is "
            f"{spec.image_size} x {spec.image_size}.",
            hint=f"Choose a model that pools globally (airbench, resnet18), or prepare the data with "
            f"--image-size {fixed}.",
        )
    return spec


def check_small_images(settings: Settings, device_type: str, num_classes: int) -> None:
    """train.low_res's first epochs on smaller images, refused before any training or timing for a model that
    cannot take them: one made for a fixed size, or one whose pooling stages run out of pixels."""
    train, model_name = settings.train, settings.model.name
    if not train.low_res.applies(device_type, train.time_budget is not None):
        return
    side = int(train.low_res.size or 0)
    fixed = fixed_image_size(model_name)
    if fixed is not None and side != fixed:
        reason = f"it takes {fixed} x {fixed} images only"
    else:
        try:  # the geometry does not depend on the width: the smallest network answers at once
            with torch.no_grad():
                build_model(model_name, 0.125, num_classes).eval()(torch.zeros(1, 3, side, side))
            return
        except RuntimeError:
            reason = "its pooling stages run out of pixels"
    raise UsageError(
        f"train.low_res: model {model_name} cannot train its first epochs on {side} x {side} images: {reason}.",
        hint="Set train.low_res.size=null (no small-image epochs) or a larger size, or choose a model that pools "
        "globally (airbench, resnet18: 16 px works).",
    )


@dataclass(frozen=True)
class Splits:
    """Training images, the split each epoch is evaluated on, and the test split read once at the end.

    `epoch_split` is "val" where the recipe holds images out of training, else "test": then the test split is scored
    each epoch for the curves only, and nothing (best.pth, early stopping, the plateau scheduler) reads it.
    """

    train: Split
    evaluation: Split
    test: Split
    epoch_split: str


def load_splits(data: DataSettings, val_size_for: Callable[[int], int], seed: int) -> Splits:
    """The prepared cache split; `val_size_for(training images)` says how many to hold out for validation."""
    cache = load_cache(data.processed_dir)
    images, labels = cache["train_images"], cache["train_labels"]
    val_size = val_size_for(len(labels))
    test = (cache["test_images"], cache["test_labels"])
    if not val_size:
        return Splits(training_subset(images, labels, data.train_subset, seed), test, test, "test")
    if val_size >= len(labels):
        raise UsageError(f"data.val_size={val_size} leaves no training images (the split has {len(labels)}).")
    train_index, val_index = stratified_split(labels, val_size, seed)
    train = training_subset(images[train_index], labels[train_index], data.train_subset, seed)
    return Splits(train, (images[val_index], labels[val_index]), test, "val")


def training_subset(images: torch.Tensor, labels: torch.Tensor, size: int | None, seed: int) -> Split:
    """`size` of the images, spread evenly over the classes (seeded); all of them where `size` is None or larger."""
    if size is None or size >= len(labels):
        return images, labels
    _, chosen = stratified_split(labels, size, seed + 1)  # another draw than the validation split's
    return images[chosen], labels[chosen]


@dataclass(frozen=True)
class Loaders:
    train: BatchLoader  # augmented, this process's share under DDP
    evaluation: BatchLoader  # each epoch's
    test: BatchLoader  # the final evaluation's (the same loader where the epochs are scored on the test split)


def build_loaders(
    splits: Splits,
    train: TrainSettings,
    spec: DataSpec,
    precision: Precision,
    device: torch.device,
    context: DistContext,
) -> Loaders:
    # Autocast would cast the inputs anyway; producing them in its dtype saves a conversion pass per batch.
    input_dtype = precision.autocast_dtype or torch.float32
    images, labels = splits.train
    training = BatchLoader(
        images.to(device),
        labels.to(device),
        train.batch_size,
        train=True,
        spec=spec,
        augment=Augment(**train.augment.pixel_augment()),
        seed=train.seed,
        dtype=input_dtype,
        channels_last=train.channels_last,
        rank=context.rank,
        world_size=context.world_size,
        balanced=train.balanced_sampler,
        low_res=(train.low_res.size, train.low_res.epochs) if train.low_res.size else None,
    )
    if len(training) == 0:
        raise UsageError("No training batches: the training split is smaller than one batch per process.")

    def evaluation_loader(split: Split) -> BatchLoader:
        return BatchLoader(
            split[0].to(device),
            split[1].to(device),
            train.eval_batch_size,
            train=False,
            spec=spec,
            dtype=input_dtype,
            channels_last=train.channels_last,
        )

    evaluation = evaluation_loader(splits.evaluation)
    test = evaluation if splits.epoch_split == "test" else evaluation_loader(splits.test)
    return Loaders(training, evaluation, test)


@dataclass
class Parts:
    """The model and everything that steps it; a checkpoint holds the state of each."""

    model: nn.Module  # the weights (saved, evaluated)
    train_model: nn.Module  # what the steps call: the model, wrapped by DDP and torch.compile where asked
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler | None
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    lookahead: Lookahead | None
    total_steps: int
    started_from: dict[str, Any] | None = None  # the checkpoint a fine-tuning run started from (finetune.py)
    freezer: BodyFreezer | None = None
    ema: WeightAverage | None = None  # train.ema: the averaged weights, evaluated and kept beside the trained ones

    @property
    def evaluated_model(self) -> nn.Module:
        """The weights each epoch's evaluation and the final one score: the average where the run keeps one."""
        return self.ema.module if self.ema is not None else self.model


def build_parts(
    settings: Settings,
    spec: DataSpec,
    loader: BatchLoader,
    device: torch.device,
    precision: Precision,
    context: DistContext,
    source: Source | None = None,
    pretrained: Pretrained | None = None,
) -> Parts:
    """The model (initialised from `source`'s weights where a run fine-tunes, or from a torchvision model's
    `pretrained` weights), its optimiser and the rest."""
    model = build_model(
        settings.model.name, settings.model.width_multiplier, spec.num_classes, settings.model.activation
    )
    init_from_data = getattr(model, "init_from_data", None)
    started_from = None
    if source is not None:  # before the optimiser and lookahead copy anything
        started_from = load_weights(model, source, spec.class_names)
    elif pretrained is not None:
        started_from = pretrained.load_into(model)
    elif init_from_data is not None:
        sample = loader.images[: min(WHITENING_SAMPLE, len(loader.images))].cpu()
        init_from_data(normalize(sample, torch.float32, False, spec))  # fp32, outside autocast
    memory_format = torch.channels_last if settings.train.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    # Muon's matrix products in the step's precision: bf16 only where it was chosen for being fast here.
    optimizer = build_optimizer(
        model, settings.optim, precision.autocast_dtype or torch.float32, whitening_bias_apart(model, settings.model)
    )
    scheduler = build_scheduler(
        optimizer,
        settings.scheduler,
        settings.train.epochs,
        len(loader),
        settings.train.early_stopping.mode,
        apart_epochs=settings.model.whiten_bias_epochs,
    )
    train_model: nn.Module = model
    if context.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        # A frozen whitening bias (airbench, after a few epochs) stops receiving gradients mid-run.
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=hasattr(model, "whiten_bias_trainable")
        )
    if settings.train.compile:
        train_model = torch.compile(train_model)
    frozen_epochs = settings.train.freeze_epochs if settings.starts_from_weights else 0
    freezer = BodyFreezer(model, frozen_epochs, context.enabled) if frozen_epochs else None
    return Parts(
        model,
        train_model,
        optimizer,
        scheduler,
        torch.amp.GradScaler(device.type, enabled=precision.use_grad_scaler),
        criterion(settings, loader.labels, spec.num_classes),
        Lookahead(model) if settings.train.lookahead else None,
        settings.train.epochs * len(loader),
        started_from,
        freezer,
        weight_average(model, settings, len(loader)),
    )


def whitening_bias_apart(model: nn.Module, settings: ModelSettings) -> tuple[nn.Parameter, ...]:
    """The whitening bias, where it follows a schedule of its own (airbench, `model.whiten_bias_schedule: decay`)."""
    whiten = getattr(model, "whiten", None)
    if settings.whiten_bias_schedule != "decay" or whiten is None or whiten.bias is None:
        return ()
    return (whiten.bias,)


def weight_average(model: nn.Module, settings: Settings, steps_per_epoch: int) -> WeightAverage | None:
    ema = settings.train.ema
    if not ema.enabled:
        return None
    return WeightAverage(model, ema.effective_decay(), round(ema.start_epoch * steps_per_epoch))


def criterion(settings: Settings, labels: torch.Tensor, classes: int) -> nn.Module:
    """Cross-entropy with the recipe's label smoothing and class weights; blended with a teacher's logits where
    the run distils (recipe/distill.py)."""
    plain = nn.CrossEntropyLoss(
        weight=class_weights(settings.train, labels, classes), label_smoothing=settings.optim.label_smoothing
    )
    distill = settings.train.distill
    return plain if distill.teacher is None else DistillationLoss(plain, distill.alpha, distill.temperature)


def class_weights(train: TrainSettings, labels: torch.Tensor, classes: int) -> torch.Tensor | None:
    """`auto`: each class weighted by the inverse of its share of the training split, scaled so that a balanced
    split gets weight 1 everywhere (N / (classes x count)); a class with no images gets 0. None: unweighted."""
    if train.class_weights == "none":
        return None
    counts = torch.bincount(labels.cpu(), minlength=classes).double()
    weights = torch.where(counts > 0, len(labels) / (classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float().to(labels.device)

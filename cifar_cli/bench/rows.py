"""The rows of `cifar bench`'s tables: the input pipelines, every model's train step, and the `fast` preset's real
step (each repeat in a new process)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_cli.bench.measure import (
    CPU_MICRO_BATCH,
    BenchOptions,
    Candidate,
    Measurement,
    Stepper,
    adam_optimizer,
    forever,
    light,
    measure,
    one_repeat,
)
from cifar_cli.budget.flops import train_step_flops_per_image
from cifar_cli.budget.probe import Calibration, measure_speed
from cifar_cli.config.sections import DataSettings
from cifar_cli.config.settings import Settings, load_settings
from cifar_cli.data.loader import Augment, BatchLoader
from cifar_cli.data.prepare import load_cache, read_spec
from cifar_cli.errors import UsageError
from cifar_cli.models import available_models, build_model_for_measuring
from cifar_cli.recipe.optim import build_optimizer
from cifar_cli.runtime.device import resolve_precision
from cifar_cli.runtime.memory import keep_freed_memory, keep_freed_memory_supported


def _seed_style_loader(processed_dir: Path, batch_size: int, workers: int) -> Any:
    """The seed's input pipeline: ImageFolder of PNG files, per-sample transforms, a shuffling DataLoader."""
    from torchvision import datasets, transforms

    spec = read_spec(processed_dir)
    transform = transforms.Compose(
        [
            transforms.RandomCrop(spec.image_size, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )
    dataset = datasets.ImageFolder(str(processed_dir / "train"), transform=transform)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True
    )


def _fresh_model(
    name: str, device: torch.device, channels_last: bool, width: float = 1.0, num_classes: int = 10
) -> nn.Module:
    """Synthetic benchmarks keep CIFAR-10's ten classes; those on prepared data take the data's count."""
    torch.manual_seed(0)
    model = build_model_for_measuring(name, width, num_classes, images=512)
    return model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def bench_pipeline(
    options: BenchOptions, data: DataSettings, device: torch.device, choice: Calibration
) -> list[Measurement]:
    """The seed-style pipeline (reference) and ours (in `choice`'s precision and layout), same model and batch."""
    cache = load_cache(data.processed_dir)
    mixed = resolve_precision(choice.precision, device)
    fp32 = resolve_precision("fp32", device)
    flops = train_step_flops_per_image(options.model)
    seed_loader = _seed_style_loader(data.processed_dir, options.batch_size, options.seed_workers)
    ours_loader = BatchLoader(
        cache["train_images"].to(device),
        cache["train_labels"].to(device),
        options.batch_size,
        train=True,
        spec=read_spec(data.processed_dir),
        augment=Augment(flip=True, translate=4),
        dtype=mixed.autocast_dtype or torch.float32,
        channels_last=choice.channels_last,
    )
    classes = read_spec(data.processed_dir).num_classes
    seed_model = _fresh_model(options.model, device, False, num_classes=classes)
    reference = Candidate(
        "seed-style: PNG + DataLoader, fp32",
        lambda: forever(seed_loader),
        Stepper(seed_model, fp32, device, adam_optimizer(seed_model, fused=False)),
        options.batch_size,
        "fp32",
        flops,
    )
    ours = Candidate(
        f"in-memory on {device.type}, {choice.layout.label}",
        lambda: forever(ours_loader),
        Stepper(_fresh_model(options.model, device, choice.channels_last, num_classes=classes), mixed, device),
        options.batch_size,
        mixed.name,
        flops,
    )
    return measure([reference, ours], options)


def _synthetic(batch_size: int, device: torch.device, dtype: torch.dtype, channels_last: bool):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, 32, 32, generator=generator).to(device, dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch_size,), generator=generator).to(device)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield images, labels

    return batches


def bench_models(options: BenchOptions, device: torch.device) -> list[Measurement]:
    """Train-step throughput per model: fp32 (reference) and mixed precision (bf16 on CPUs), each in both layouts."""
    mixed = resolve_precision("bf16" if device.type == "cpu" else "auto", device)
    fp32 = resolve_precision("fp32", device)
    rows = []
    for name in options.models or tuple(available_models()):
        flops = train_step_flops_per_image(name)
        configs = [
            ("fp32", fp32, False),
            ("fp32 + channels_last", fp32, True),
            (mixed.name, mixed, False),
            (f"{mixed.name} + channels_last", mixed, True),
        ]
        candidates = [
            Candidate(
                f"{name}: {label}",
                _synthetic(options.batch_size, device, precision.autocast_dtype or torch.float32, channels_last),
                Stepper(_fresh_model(name, device, channels_last), precision, device),
                options.batch_size,
                precision.name,
                flops,
            )
            for label, precision, channels_last in configs
        ]
        rows += measure(candidates, options)
    return rows


@dataclass(frozen=True)
class FastRows:
    preset: Measurement  # the step as `cifar train` runs it
    system_malloc: Measurement | None  # the same step with glibc's malloc defaults (heap not kept)
    micro_batches: Measurement | None  # the same step in micro-batches

    def rows(self) -> list[Measurement]:
        return [row for row in (self.preset, self.system_malloc, self.micro_batches) if row is not None]


@dataclass(frozen=True)
class FastJob:
    """Everything a fresh process needs to time one configuration of the fast preset's step (picklable)."""

    fast: Settings
    data: DataSettings
    device: str
    micro_batch_size: int | None
    keep_freed_memory: bool
    options: BenchOptions
    precision: str  # and layout: as `cifar train` chooses them here
    channels_last: bool


def fast_candidate(job: FastJob, device: torch.device) -> Candidate:
    train = job.fast.train
    precision = resolve_precision(job.precision, device)
    cache = load_cache(job.data.processed_dir)
    loader = BatchLoader(
        cache["train_images"].to(device),
        cache["train_labels"].to(device),
        train.batch_size,
        train=True,
        spec=read_spec(job.data.processed_dir),
        augment=Augment(**train.augment.pixel_augment()),
        dtype=precision.autocast_dtype or torch.float32,
        channels_last=job.channels_last,
    )
    classes = read_spec(job.data.processed_dir).num_classes
    model = _fresh_model(job.fast.model.name, device, job.channels_last, job.fast.model.width_multiplier, classes)
    # The preset's optimiser and parameter groups at a small lr: from a random start the full lr could
    # diverge, and NaN/denormal arithmetic would distort the timing.
    optimizer = build_optimizer(
        model, job.fast.optim.model_copy(update={"lr": 0.01}), precision.autocast_dtype or torch.float32
    )
    step = Stepper(model, precision, device, optimizer, job.micro_batch_size)
    return Candidate("", lambda: forever(loader), step, train.batch_size)


def _time_fast_job(job: FastJob) -> tuple[float, float, float]:
    """Runs in a fresh process, so that the malloc mode and the heap left by other rows cannot leak in."""
    device = torch.device(job.device)
    if job.keep_freed_memory:
        keep_freed_memory(device.type)
    return one_repeat(fast_candidate(job, device), job.options)


@dataclass
class _IsolatedCandidate:
    """A candidate whose every repeat runs in a new spawned process."""

    name: str
    batch_size: int
    job: FastJob
    precision: str = "fp32"
    flops_per_image: float = 0.0

    def repeat(self, options: BenchOptions) -> tuple[float, float, float]:
        job = replace(self.job, options=options)
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_time_fast_job, job).result()


def bench_fast_preset(
    options: BenchOptions,
    data: DataSettings,
    device: torch.device,
    fast: Settings | None = None,
    micro_batch_size: int = CPU_MICRO_BATCH,
    choice: Calibration | None = None,
) -> FastRows:
    """The `fast` preset's step as training runs it (its model, optimiser, batch size and augmentation), against
    the same step with glibc's malloc defaults (CPU on Linux, when `cifar train` would keep freed memory) and cut
    into micro-batches of `micro_batch_size`; each repeat of each row in a fresh process."""
    fast = fast or load_settings(None, {"preset": "fast"})
    train = fast.train
    if len(load_cache(data.processed_dir)["train_labels"]) < train.batch_size:
        raise UsageError(
            f"The fast preset's batch of {train.batch_size} is larger than the training split.",
            hint="Use the full data set, or leave this row out with --no-fast.",
        )
    keep = options.keep_freed_memory and keep_freed_memory_supported(device.type)
    choice = choice or measure_speed(fast.model, fast.optim, train.batch_size, device)
    flops = train_step_flops_per_image(fast.model.name, fast.model.width_multiplier)

    def candidate(micro_batch_size: int | None, keep_memory: bool) -> _IsolatedCandidate:
        chunks = f" in chunks of {micro_batch_size}" if micro_batch_size else ", whole"
        malloc = "" if device.type != "cpu" else ", heap kept" if keep_memory else ", malloc defaults"
        name = (
            f"fast preset: {fast.model.name}, {fast.optim.name}, batch {train.batch_size}{chunks},"
            f" {choice.layout.label}{malloc}"
        )
        job = FastJob(
            fast, data, str(device), micro_batch_size, keep_memory, options, choice.precision, choice.channels_last
        )
        return _IsolatedCandidate(name, train.batch_size, job, choice.precision, flops)

    candidates = {"preset": candidate(train.micro_batch_size, keep)}
    if keep:
        candidates["system_malloc"] = candidate(train.micro_batch_size, False)
    other = micro_batch_size if micro_batch_size < train.batch_size else None
    if other is not None and other != train.micro_batch_size:
        candidates["micro_batches"] = candidate(other, keep)
    rows = dict(zip(candidates, measure(list(candidates.values()), light(options))))
    if len(rows) == 1:
        rows["preset"].ratio = None  # nothing to compare with
    return FastRows(rows["preset"], rows.get("system_malloc"), rows.get("micro_batches"))

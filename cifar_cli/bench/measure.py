"""Timing machinery of `cifar bench`: a step under test, warm-up, timed windows of at least `min_seconds`, medians
over repeats."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from cifar_cli.budget.probe import machine_identity
from cifar_cli.recipe.optim import use_fused_kernels
from cifar_cli.runtime.device import Precision, describe_device
from cifar_cli.train.step import forward_backward

TRAIN_IMAGES = 50_000  # one CIFAR-10 epoch
CPU_MICRO_BATCH = 500  # images per chunk in the fast table's micro-batch row


@dataclass
class Measurement:
    name: str
    batch_size: int
    images_per_second: float  # median over repeats
    data_seconds_per_batch: float  # time waiting for the next batch
    compute_seconds_per_batch: float  # forward + backward + optimiser step
    ratio: float | None = None  # against the reference row of its table
    per_repeat: list[float] = field(default_factory=list)  # images/s of each repeat, in order
    precision: str = "fp32"  # of the step's matrix work: its ceiling is the machine's rate in this precision
    flops_per_image: float = 0.0  # train step FLOPs per image (budget/flops.py); 0 when not counted
    utilisation: float | None = None  # FLOP/s over the ceiling of `precision`; set by run_benchmark
    epoch_seconds: float = field(init=False)

    def __post_init__(self) -> None:
        self.epoch_seconds = TRAIN_IMAGES / self.images_per_second

    @property
    def data_share(self) -> float:
        total = self.data_seconds_per_batch + self.compute_seconds_per_batch
        return self.data_seconds_per_batch / total if total else 0.0


@dataclass(frozen=True)
class BenchOptions:
    model: str = "seed-cnn"
    device: str = "auto"
    batches: int = 10  # timed batches per repeat, at least
    min_seconds: float = 1.0  # each timed window goes on, batch after batch, until it has run this long (s)
    warmup: int = 2  # untimed batches before each measurement
    repeats: int = 3
    batch_size: int = 128
    seed_workers: int = 2  # DataLoader workers of the seed-style pipeline
    models: tuple[str, ...] = ()  # () = every registered model
    include_fast: bool = True
    keep_freed_memory: bool = True  # CPU on Linux: malloc keeps freed memory, as `cifar train` does


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def adam_optimizer(model: nn.Module, fused: bool) -> torch.optim.Optimizer:
    """Adam at lr 1e-3 as the seed trains; ours with the fused kernels that `cifar train` uses."""
    return torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)


class Stepper:
    """One optimiser step of `model` on a batch, timed with device synchronisation."""

    def __init__(
        self,
        model: nn.Module,
        precision: Precision,
        device: torch.device,
        optimizer: torch.optim.Optimizer | None = None,
        micro_batch_size: int | None = None,
    ) -> None:
        self.model, self.precision, self.device = model.train(), precision, device
        self.optimizer = optimizer or adam_optimizer(model, fused=use_fused_kernels(model))
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.use_grad_scaler)
        self.micro_batch_size = micro_batch_size

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        forward_backward(
            self.model, images, labels, nn.functional.cross_entropy, self.precision, self.scaler, self.micro_batch_size
        )
        self.scaler.step(self.optimizer)
        self.scaler.update()


@dataclass
class Candidate:
    """One configuration to time: where its batches come from and the step that consumes them."""

    name: str
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    step: Stepper
    batch_size: int
    precision: str = "fp32"
    flops_per_image: float = 0.0

    def repeat(self, options: BenchOptions) -> tuple[float, float, float]:
        return one_repeat(self, options)


class Timed(Protocol):
    name: str
    batch_size: int
    precision: str
    flops_per_image: float

    def repeat(self, options: BenchOptions) -> tuple[float, float, float]: ...


def one_repeat(candidate: Candidate, options: BenchOptions) -> tuple[float, float, float]:
    """(images/s, data seconds per batch, compute seconds per batch) over at least `options.batches` timed steps
    and at least `options.min_seconds`."""
    device = candidate.step.device
    iterator = on_device(candidate.batches(), device)
    try:
        for _ in range(options.warmup):
            candidate.step(*next(iterator))
        sync(device)
        data_total = compute_total = 0.0
        timed = 0
        while timed < options.batches or data_total + compute_total < options.min_seconds:
            timed += 1
            started = time.perf_counter()
            images, labels = next(iterator)
            sync(device)
            loaded = time.perf_counter()
            candidate.step(images, labels)
            sync(device)
            data_total += loaded - started
            compute_total += time.perf_counter() - loaded
    finally:
        iterator.close()  # ends this candidate's loading (and its worker processes) before the next is timed
    throughput = timed * candidate.batch_size / (data_total + compute_total)
    return throughput, data_total / timed, compute_total / timed


def measure(candidates: Sequence[Timed], options: BenchOptions) -> list[Measurement]:
    """Medians over repeats, the candidates taking turns within each repeat so that a slow spell of a shared
    machine hits all of them alike; ratios are against the first candidate."""
    samples: list[list[tuple[float, float, float]]] = [[] for _ in candidates]
    for _ in range(options.repeats):
        for candidate, collected in zip(candidates, samples):
            collected.append(candidate.repeat(options))
    rows = []
    for candidate, collected in zip(candidates, samples):
        throughput, data, compute = (statistics.median(values) for values in zip(*collected))
        per_repeat = [images_per_second for images_per_second, _, _ in collected]
        rows.append(
            Measurement(
                candidate.name,
                candidate.batch_size,
                throughput,
                data,
                compute,
                per_repeat=per_repeat,
                precision=candidate.precision,
                flops_per_image=candidate.flops_per_image,
            )
        )
    for row in rows:
        row.ratio = row.images_per_second / rows[0].images_per_second
    return rows


def on_device(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The seed-style loader yields CPU tensors: the copy to the device counts as data time, as in the seed."""
    for images, labels in batches:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def forever(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        batches = iter(loader)
        try:
            yield from batches
        finally:
            # Dropping a DataLoader iterator stops its worker processes and waits for them: otherwise they go on
            # decoding the batches they were asked to prefetch while the next candidate is being timed.
            del batches
        epoch += 1


def light(options: BenchOptions) -> BenchOptions:
    """Fewer timed batches for the big `fast` batches; two warm-up steps, as each repeat starts a new process."""
    return BenchOptions(**{**asdict(options), "batches": max(2, options.batches // 3), "warmup": 2})


def utilisation(row: Measurement, ceiling: dict[str, float]) -> float | None:
    rate = ceiling.get(row.precision)
    return row.flops_per_image * row.images_per_second / rate if rate and row.flops_per_image else None


def machine_facts(device: torch.device) -> dict[str, Any]:
    return {
        "device": describe_device(device),
        "cpu": machine_identity(device)["cpu"],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }

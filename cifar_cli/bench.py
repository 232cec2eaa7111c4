"""`cifar bench`: throughput measured in one run on this machine, with ratios against references from the same run.

1. Pipeline: our in-memory, on-device batches (mixed precision, channels_last) against the seed's pipeline (one PNG per
   sample through a torchvision DataLoader with its transforms, fp32, Adam), same model; ours steps Adam with the
   fused kernels that `cifar train` uses.
2. Models: the train step of every registered model on synthetic batches in fp32 and mixed precision (bf16 on CPUs),
   each in both memory layouts, with its utilisation of this machine's ceiling (engine/flops.py).
3. The `fast` preset's real step (its model, optimiser and batch size, augmentation included) and its epoch time,
   against the same step with glibc's malloc defaults (`cifar train` keeps freed memory: engine/memory.py) and cut
   into micro-batches of 500; every repeat of these rows runs in a new process.

Our pipeline and the `fast` rows use the precision and layout `cifar train` would choose here (engine/calibrate.py);
the bench prints those decisions and the ceiling: the FLOP/s of a large matrix multiply in fp32 and bf16.

Warm-up steps are not timed; each figure is the median over repeats, and every timed window runs for at least
`min_seconds`, so that a 20 ms step is not judged on a fraction of a second of a shared, noisy machine. The pipeline
ratio is also given per repeat (reference and ours timed back to back), which shows how much the machine moved.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from cifar_cli.data import ensure_prepared
from cifar_cli.data.loader import Augment, BatchLoader
from cifar_cli.data.prepare import load_cache, read_manifest, read_spec
from cifar_cli.data.spec import CIFAR10_SPEC
from cifar_cli.engine.calibrate import Calibration, calibrate, machine_identity
from cifar_cli.engine.device import Precision, describe, resolve_device, resolve_precision
from cifar_cli.engine.flops import machine_ceiling, train_step_flops_per_image
from cifar_cli.engine.memory import keep_freed_memory, keep_freed_memory_supported
from cifar_cli.engine.optim import build_optimizer, use_fused_kernels
from cifar_cli.engine.step import forward_backward
from cifar_cli.errors import UsageError
from cifar_cli.models import available_models, build_model
from cifar_cli.settings import DataSettings, ModelSettings, OptimSettings, Settings, load_settings

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
    flops_per_image: float = 0.0  # train step FLOPs per image (engine/flops.py); 0 when not counted
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _adam(model: nn.Module, fused: bool) -> torch.optim.Optimizer:
    """Adam at lr 1e-3 as the seed trains; ours with the fused kernels that `cifar train` uses."""
    return torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)


class _Stepper:
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
        self.optimizer = optimizer or _adam(model, fused=use_fused_kernels(model))
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.use_grad_scaler)
        self.micro_batch_size = micro_batch_size

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        forward_backward(
            self.model,
            images,
            labels,
            nn.functional.cross_entropy,
            self.precision,
            self.scaler,
            self.micro_batch_size,
        )
        self.scaler.step(self.optimizer)
        self.scaler.update()


@dataclass
class _Candidate:
    """One configuration to time: where its batches come from and the step that consumes them."""

    name: str
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    step: _Stepper
    batch_size: int
    precision: str = "fp32"
    flops_per_image: float = 0.0

    def repeat(self, options: BenchOptions) -> tuple[float, float, float]:
        return _one_repeat(self, options)


class _Timed(Protocol):
    name: str
    batch_size: int
    precision: str
    flops_per_image: float

    def repeat(self, options: BenchOptions) -> tuple[float, float, float]: ...


def _one_repeat(candidate: _Candidate, options: BenchOptions) -> tuple[float, float, float]:
    """(images/s, data seconds per batch, compute seconds per batch) over at least `options.batches` timed steps
    and at least `options.min_seconds`."""
    device = candidate.step.device
    iterator = _on_device(candidate.batches(), device)
    try:
        for _ in range(options.warmup):
            candidate.step(*next(iterator))
        _sync(device)
        data_total = compute_total = 0.0
        timed = 0
        while timed < options.batches or data_total + compute_total < options.min_seconds:
            timed += 1
            started = time.perf_counter()
            images, labels = next(iterator)
            _sync(device)
            loaded = time.perf_counter()
            candidate.step(images, labels)
            _sync(device)
            data_total += loaded - started
            compute_total += time.perf_counter() - loaded
    finally:
        iterator.close()  # ends this candidate's loading (and its worker processes) before the next is timed
    throughput = timed * candidate.batch_size / (data_total + compute_total)
    return throughput, data_total / timed, compute_total / timed


def _measure(candidates: Sequence[_Timed], options: BenchOptions) -> list[Measurement]:
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


def _on_device(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The seed-style loader yields CPU tensors: the copy to the device counts as data time, as in the seed."""
    for images, labels in batches:
        yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def _forever(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
    )


def _fresh_model(
    name: str, device: torch.device, channels_last: bool, width: float = 1.0, num_classes: int = 10
) -> nn.Module:
    """Synthetic benchmarks keep CIFAR-10's ten classes; those on prepared data take the data's count."""
    torch.manual_seed(0)
    model = build_model(name, width, num_classes)
    init = getattr(model, "init_from_data", None)
    if init is not None:
        init(torch.randn(512, 3, 32, 32))
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
    reference = _Candidate(
        "seed-style: PNG + DataLoader, fp32",
        lambda: _forever(seed_loader),
        _Stepper(seed_model, fp32, device, _adam(seed_model, fused=False)),
        options.batch_size,
        "fp32",
        flops,
    )
    ours = _Candidate(
        f"in-memory on {device.type}, {choice.layout.label}",
        lambda: _forever(ours_loader),
        _Stepper(
            _fresh_model(options.model, device, choice.channels_last, num_classes=classes), mixed, device
        ),
        options.batch_size,
        mixed.name,
        flops,
    )
    return _measure([reference, ours], options)


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
            _Candidate(
                f"{name}: {label}",
                _synthetic(
                    options.batch_size, device, precision.autocast_dtype or torch.float32, channels_last
                ),
                _Stepper(_fresh_model(name, device, channels_last), precision, device),
                options.batch_size,
                precision.name,
                flops,
            )
            for label, precision, channels_last in configs
        ]
        rows += _measure(candidates, options)
    return rows


@dataclass(frozen=True)
class FastRows:
    preset: Measurement  # the step as `cifar train` runs it
    system_malloc: Measurement | None  # the same step with glibc's malloc defaults (heap not kept)
    micro_batches: Measurement | None  # the same step in micro-batches

    def rows(self) -> list[Measurement]:
        return [row for row in (self.preset, self.system_malloc, self.micro_batches) if row is not None]


@dataclass(frozen=True)
class _FastJob:
    """Everything a fresh process needs to time one configuration of the fast preset's step (picklable)."""

    fast: Settings
    data: DataSettings
    device: str
    micro_batch_size: int | None
    keep_freed_memory: bool
    options: BenchOptions
    precision: str  # and layout: as `cifar train` chooses them here
    channels_last: bool


def _fast_candidate(job: _FastJob, device: torch.device) -> _Candidate:
    train = job.fast.train
    precision = resolve_precision(job.precision, device)
    cache = load_cache(job.data.processed_dir)
    loader = BatchLoader(
        cache["train_images"].to(device),
        cache["train_labels"].to(device),
        train.batch_size,
        train=True,
        spec=read_spec(job.data.processed_dir),
        augment=Augment(**train.augment.model_dump()),
        dtype=precision.autocast_dtype or torch.float32,
        channels_last=job.channels_last,
    )
    classes = read_spec(job.data.processed_dir).num_classes
    model = _fresh_model(
        job.fast.model.name, device, job.channels_last, job.fast.model.width_multiplier, classes
    )
    # The preset's optimiser and parameter groups at a small lr: from a random start the full lr could
    # diverge, and NaN/denormal arithmetic would distort the timing.
    optimizer = build_optimizer(
        model, job.fast.optim.model_copy(update={"lr": 0.01}), precision.autocast_dtype or torch.float32
    )
    step = _Stepper(model, precision, device, optimizer, job.micro_batch_size)
    return _Candidate("", lambda: _forever(loader), step, train.batch_size)


def _time_fast_job(job: _FastJob) -> tuple[float, float, float]:
    """Runs in a fresh process, so that the malloc mode and the heap left by other rows cannot leak in."""
    device = torch.device(job.device)
    if job.keep_freed_memory:
        keep_freed_memory(device.type)
    return _one_repeat(_fast_candidate(job, device), job.options)


@dataclass
class _IsolatedCandidate:
    """A candidate whose every repeat runs in a new spawned process."""

    name: str
    batch_size: int
    job: _FastJob
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
    choice = choice or calibrate(fast.model, fast.optim, train.batch_size, device)
    flops = train_step_flops_per_image(fast.model.name, fast.model.width_multiplier)

    def candidate(micro_batch_size: int | None, keep_memory: bool) -> _IsolatedCandidate:
        chunks = f" in chunks of {micro_batch_size}" if micro_batch_size else ", whole"
        malloc = "" if device.type != "cpu" else ", heap kept" if keep_memory else ", malloc defaults"
        name = (
            f"fast preset: {fast.model.name}, {fast.optim.name}, batch {train.batch_size}{chunks},"
            f" {choice.layout.label}{malloc}"
        )
        job = _FastJob(
            fast,
            data,
            str(device),
            micro_batch_size,
            keep_memory,
            options,
            choice.precision,
            choice.channels_last,
        )
        return _IsolatedCandidate(name, train.batch_size, job, choice.precision, flops)

    candidates = {"preset": candidate(train.micro_batch_size, keep)}
    if keep:
        candidates["system_malloc"] = candidate(train.micro_batch_size, False)
    other = micro_batch_size if micro_batch_size < train.batch_size else None
    if other is not None and other != train.micro_batch_size:
        candidates["micro_batches"] = candidate(other, keep)
    rows = dict(zip(candidates, _measure(list(candidates.values()), _light(options))))
    if len(rows) == 1:
        rows["preset"].ratio = None  # nothing to compare with
    return FastRows(rows["preset"], rows.get("system_malloc"), rows.get("micro_batches"))


def _light(options: BenchOptions) -> BenchOptions:
    """Fewer timed batches for the big `fast` batches; two warm-up steps, as each repeat starts a new process."""
    return BenchOptions(**{**asdict(options), "batches": max(2, options.batches // 3), "warmup": 2})


def run_benchmark(
    options: BenchOptions, data: DataSettings, say: Callable[[str], None] = lambda _t: None
) -> dict[str, Any]:
    device = resolve_device(options.device)
    # The pipeline and model rows run as `cifar train` would.
    malloc_keeps_memory = options.keep_freed_memory and keep_freed_memory(device.type)
    ensure_prepared(data, say)
    manifest = read_manifest(data.processed_dir) or {}
    if not manifest.get("png"):
        raise UsageError(
            "The seed-style pipeline needs the PNG folders.", hint="Run `cifar prepare` without --no-png."
        )
    if options.model not in available_models():
        raise UsageError(
            f"Unknown model {options.model!r}.", hint=f"Choose one of: {', '.join(available_models())}."
        )
    say("Ceiling: large matrix multiplies in fp32 and bf16")
    ceiling = machine_ceiling(device)
    decisions = [
        calibrate(ModelSettings(name=options.model), OptimSettings(name="adam"), options.batch_size, device)
    ]
    say(f"{options.model}, batch {options.batch_size}: {decisions[0].summary()}")
    say(f"Pipeline: {options.model}, batch {options.batch_size}, on {describe(device)}")
    pipeline = bench_pipeline(options, data, device, decisions[0])
    say("Models: synthetic batches, fp32 vs mixed precision")
    models = bench_models(options, device)
    fast = None
    if options.include_fast:
        preset = load_settings(None, {"preset": "fast"})
        decisions.append(calibrate(preset.model, preset.optim, preset.train.batch_size, device))
        say(f"fast preset: {decisions[-1].summary()}")
        say("fast preset: real batches with augmentation, each repeat in a new process")
        fast = bench_fast_preset(options, data, device, preset, choice=decisions[-1])
    for row in [*pipeline, *models, *(fast.rows() if fast else [])]:
        row.utilisation = _utilisation(row, ceiling)
    return {
        "machine": {**_machine(device), "keep_freed_memory": malloc_keeps_memory},
        "options": asdict(options),
        # FLOP/s of a 2048 x 2048 matrix multiply per precision: what the step's utilisation is measured against.
        "ceiling": ceiling,
        # What `cifar train` chooses here for the pipeline's model (Adam) and for the fast preset.
        "precision_decisions": [_decision(choice) for choice in decisions],
        "pipeline": [_row(m) for m in pipeline],
        "pipeline_speedup": pipeline[1].ratio,
        # Ours over the reference in each repeat (timed back to back): the spread says how much the machine moved.
        "pipeline_speedup_per_repeat": [
            ours / reference for reference, ours in zip(pipeline[0].per_repeat, pipeline[1].per_repeat)
        ],
        "models": [_row(m) for m in models],
        "fast_preset": _row(fast.preset) if fast else None,
        # The same step with glibc's malloc defaults, and how much faster the preset's step (heap kept) is.
        "fast_preset_system_malloc": _row(fast.system_malloc) if fast and fast.system_malloc else None,
        "keep_freed_memory_speedup": _speedup(fast.preset, fast.system_malloc) if fast else None,
        # The same step in micro-batches (--set train.micro_batch_size=500) and its speed-up over the preset's.
        "fast_preset_micro_batches": _row(fast.micro_batches) if fast and fast.micro_batches else None,
        "micro_batch_speedup": _speedup(fast.micro_batches, fast.preset) if fast else None,
    }


def _utilisation(row: Measurement, ceiling: dict[str, float]) -> float | None:
    rate = ceiling.get(row.precision)
    return row.flops_per_image * row.images_per_second / rate if rate and row.flops_per_image else None


def _decision(choice: Calibration) -> dict[str, Any]:
    return {
        "model": choice.key.get("model"),
        "optimizer": choice.key.get("optimizer"),
        "batch_size": choice.key.get("batch_size"),
        "chosen": choice.layout.label,
        "train_images_per_second": choice.train_images_per_second,
        "summary": choice.summary(),
    }


def _speedup(faster: Measurement | None, reference: Measurement | None) -> float | None:
    if faster is None or reference is None:
        return None
    return faster.images_per_second / reference.images_per_second


def _row(measurement: Measurement) -> dict[str, Any]:
    return {**asdict(measurement), "data_share": measurement.data_share}


def _machine(device: torch.device) -> dict[str, Any]:
    return {
        "device": describe(device),
        "cpu": machine_identity(device)["cpu"],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


PROFILE_STEPS = 2  # profiled steps of the fast preset, after two untimed ones
PROFILE_TOP = 15  # operators listed


def profile_fast_step(options: BenchOptions, data: DataSettings) -> dict[str, Any]:
    """Where the `fast` preset's step spends its time here: operators by self time (torch.profiler), over
    `PROFILE_STEPS` steps in the precision and layout `cifar train` chooses, with the step's utilisation."""
    from torch.profiler import ProfilerActivity, profile

    device = resolve_device(options.device)
    if options.keep_freed_memory:
        keep_freed_memory(device.type)
    ensure_prepared(data)
    fast = load_settings(None, {"preset": "fast"})
    choice = calibrate(fast.model, fast.optim, fast.train.batch_size, device)
    job = _FastJob(fast, data, str(device), None, options.keep_freed_memory, options, choice.precision,
                   choice.channels_last)  # fmt: skip
    candidate = _fast_candidate(job, device)
    batches = _on_device(candidate.batches(), device)
    for _ in range(2):
        candidate.step(*next(batches))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        for _ in range(PROFILE_STEPS):
            candidate.step(*next(batches))
        _sync(device)
    seconds = (time.perf_counter() - started) / PROFILE_STEPS
    batches.close()
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events) or 1.0
    top = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:PROFILE_TOP]
    images_per_second = fast.train.batch_size / seconds
    flops = train_step_flops_per_image(fast.model.name, fast.model.width_multiplier)
    ceiling = machine_ceiling(device)
    return {
        "machine": _machine(device),
        "choice": choice.layout.label,
        "step_seconds": seconds,  # with the profiler's own overhead
        "images_per_second": images_per_second,
        "utilisation": _utilisation(
            Measurement(
                "fast",
                fast.train.batch_size,
                images_per_second,
                0.0,
                seconds,
                precision=choice.precision,
                flops_per_image=flops,
            ),
            ceiling,
        ),
        "operators": [
            {
                "name": event.key,
                "calls": event.count // PROFILE_STEPS,
                "self_seconds_per_step": event.self_cpu_time_total / 1e6 / PROFILE_STEPS,
                "share": event.self_cpu_time_total / total,
            }
            for event in top
        ],
    }


# ---------------------------------------------------------------------------------------------- export runtimes
EXPORT_BATCH = 256  # throughput rows
LATENCY_RUNS = 50  # batch-1 calls timed per runtime (after warm-up), median reported


def bench_export_runtimes(
    options: BenchOptions, say: Callable[[str], None] = lambda _t: None, model_name: str = "airbench"
) -> dict[str, Any]:
    """Inference of the `fast` preset's model (airbench, random weights, TTA as trained) on the CPU: the eager
    module, its `torch.export` program and ONNX Runtime, batch-1 latency and batch-256 throughput, in one run."""
    import tempfile

    from cifar_cli.engine.export import PixelClassifier, load_exported, onnx_bytes, pt2_bytes, require_onnx

    torch.manual_seed(0)
    classifier = PixelClassifier(build_model(model_name, 1.0).eval(), tta=2, spec=CIFAR10_SPEC).eval()
    example = torch.rand(2, 3, 32, 32)
    runners: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"eager (torch, fp32)": classifier}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        program = Path(folder) / "m.pt2"
        program.write_bytes(pt2_bytes(classifier, example, None, {"input": {"shape": ["N"]}}))
        runners["torch.export program (.pt2)"] = load_exported(program).run
        try:
            require_onnx()
            model = Path(folder) / "m.onnx"
            model.write_bytes(onnx_bytes(classifier, example, None, None, {"input": {"shape": ["N"]}}))
            runners["ONNX Runtime (CPU provider)"] = load_exported(model).run
        except UsageError as error:
            rows.append({"runtime": "ONNX Runtime", "skipped": error.message})
        for name, run in runners.items():
            say(f"Export runtimes: {name}")
            rows.append({"runtime": name, **_latency_and_throughput(run, options)})
    return {"device": "cpu", "model": f"{model_name}, TTA level 2", "rows": rows}


def _latency_and_throughput(
    run: Callable[[torch.Tensor], torch.Tensor], options: BenchOptions
) -> dict[str, float]:
    single, batch = torch.rand(1, 3, 32, 32), torch.rand(EXPORT_BATCH, 3, 32, 32)
    with torch.no_grad():
        for _ in range(max(options.warmup, 3)):
            run(single), run(batch)
        latencies = []
        for _ in range(LATENCY_RUNS):
            started = time.perf_counter()
            run(single)
            latencies.append(time.perf_counter() - started)
        started, images = time.perf_counter(), 0
        while images < EXPORT_BATCH * options.batches or time.perf_counter() - started < options.min_seconds:
            run(batch)
            images += EXPORT_BATCH
        seconds = time.perf_counter() - started
    return {
        "latency_ms_batch_1": statistics.median(latencies) * 1000,
        "images_per_second_batch_256": images / seconds,
    }

"""`cifar bench`: throughput measured in one run on this machine, with ratios against references from the same run.

1. Pipeline: our in-memory, on-device batches (mixed precision, channels_last) against the seed's pipeline (one PNG per
   sample through a torchvision DataLoader with its transforms, fp32, Adam), same model; ours steps Adam with the
   fused kernels that `cifar train` uses.
2. Models: the train step of every registered model on synthetic batches in fp32 and mixed precision (bf16 on CPUs),
   each in both memory layouts, with its utilisation of this machine's ceiling (budget/flops.py).
3. The `fast` preset's real step (its model, optimiser and batch size, augmentation included) and its epoch time,
   against the same step with glibc's malloc defaults (`cifar train` keeps freed memory: runtime/memory.py) and cut
   into micro-batches of 500; every repeat of these rows runs in a new process.

Our pipeline and the `fast` rows use the precision and layout `cifar train` would choose here (budget/probe.py);
the bench prints those decisions and the ceiling: the FLOP/s of a large matrix multiply in fp32 and bf16.

Warm-up steps are not timed; each figure is the median over repeats, and every timed window runs for at least
`min_seconds`, so that a 20 ms step is not judged on a fraction of a second of a shared, noisy machine. The pipeline
ratio is also given per repeat (reference and ours timed back to back), which shows how much the machine moved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from cifar_cli.bench.measure import BenchOptions, Measurement, machine_facts, utilisation
from cifar_cli.bench.profile import profile_fast_step
from cifar_cli.bench.rows import bench_fast_preset, bench_models, bench_pipeline
from cifar_cli.bench.runtimes import bench_export_runtimes
from cifar_cli.budget.flops import machine_ceiling
from cifar_cli.budget.probe import Calibration, measure_speed
from cifar_cli.config.sections import DataSettings, ModelSettings, OptimSettings
from cifar_cli.config.settings import load_settings
from cifar_cli.data import ensure_prepared
from cifar_cli.data.prepare import read_manifest
from cifar_cli.errors import UsageError
from cifar_cli.models import require_model
from cifar_cli.runtime.device import describe_device, resolve_device
from cifar_cli.runtime.memory import keep_freed_memory


def run_benchmark(
    options: BenchOptions, data: DataSettings, say: Callable[[str], None] = lambda _t: None
) -> dict[str, Any]:
    device = resolve_device(options.device)
    # The pipeline and model rows run as `cifar train` would.
    malloc_keeps_memory = options.keep_freed_memory and keep_freed_memory(device.type)
    ensure_prepared(data, say)
    manifest = read_manifest(data.processed_dir) or {}
    if not manifest.get("png"):
        raise UsageError("The seed-style pipeline needs the PNG folders.", hint="Run `cifar prepare` without --no-png.")
    require_model(options.model)
    say("Ceiling: large matrix multiplies in fp32 and bf16")
    ceiling = machine_ceiling(device)
    decisions = [
        measure_speed(ModelSettings(name=options.model), OptimSettings(name="adam"), options.batch_size, device)
    ]
    say(f"{options.model}, batch {options.batch_size}: {decisions[0].summary()}")
    say(f"Pipeline: {options.model}, batch {options.batch_size}, on {describe_device(device)}")
    pipeline = bench_pipeline(options, data, device, decisions[0])
    say("Models: synthetic batches, fp32 vs mixed precision")
    models = bench_models(options, device)
    fast = None
    if options.include_fast:
        preset = load_settings(None, {"preset": "fast"})
        decisions.append(measure_speed(preset.model, preset.optim, preset.train.batch_size, device))
        say(f"fast preset: {decisions[-1].summary()}")
        say("fast preset: real batches with augmentation, each repeat in a new process")
        fast = bench_fast_preset(options, data, device, preset, choice=decisions[-1])
    for row in [*pipeline, *models, *(fast.rows() if fast else [])]:
        row.utilisation = utilisation(row, ceiling)
    return {
        "machine": {**machine_facts(device), "keep_freed_memory": malloc_keeps_memory},
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


def recalibrate(model: str, batch_size: int, device_name: str, include_fast: bool) -> list[str]:
    """Forget every cached calibration and measure again: `model` with Adam at `batch_size` (the bench's pipeline
    row) and the fast preset as `cifar train` runs it. Returns what to print."""
    from cifar_cli.budget.probe import forget_calibrations

    require_model(model)
    device = resolve_device(device_name)
    lines = [f"Forgot {forget_calibrations()} cached calibration(s)."]
    lines.append(
        f"{model}, adam, batch {batch_size}: "
        + measure_speed(ModelSettings(name=model), OptimSettings(name="adam"), batch_size, device).summary()
    )
    if include_fast:
        fast = load_settings(None, {"preset": "fast"})
        measured = measure_speed(fast.model, fast.optim, fast.train.batch_size, device)
        lines.append(f"fast preset, batch {fast.train.batch_size}: {measured.summary()}")
    return lines


__all__ = ["BenchOptions", "bench_export_runtimes", "profile_fast_step", "recalibrate", "run_benchmark"]

"""`cifar bench --profile`: where the `fast` preset's step spends its time, operator by operator."""

from __future__ import annotations

import time
from typing import Any

from cifar_cli.bench.measure import BenchOptions, Measurement, machine_facts, on_device, sync, utilisation
from cifar_cli.bench.rows import FastJob, fast_candidate
from cifar_cli.budget.flops import machine_ceiling, train_step_flops_per_image
from cifar_cli.budget.probe import measure_speed
from cifar_cli.config.sections import DataSettings
from cifar_cli.config.settings import load_settings
from cifar_cli.data import ensure_prepared
from cifar_cli.runtime.device import resolve_device
from cifar_cli.runtime.memory import keep_freed_memory

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
    choice = measure_speed(fast.model, fast.optim, fast.train.batch_size, device)
    job = FastJob(
        fast, data, str(device), None, options.keep_freed_memory, options, choice.precision, choice.channels_last
    )
    candidate = fast_candidate(job, device)
    batches = on_device(candidate.batches(), device)
    for _ in range(2):
        candidate.step(*next(batches))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        for _ in range(PROFILE_STEPS):
            candidate.step(*next(batches))
        sync(device)
    seconds = (time.perf_counter() - started) / PROFILE_STEPS
    batches.close()
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events) or 1.0
    top = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:PROFILE_TOP]
    images_per_second = fast.train.batch_size / seconds
    flops = train_step_flops_per_image(fast.model.name, fast.model.width_multiplier)
    ceiling = machine_ceiling(device)
    return {
        "machine": machine_facts(device),
        "choice": choice.layout.label,
        "step_seconds": seconds,  # with the profiler's own overhead
        "images_per_second": images_per_second,
        "utilisation": utilisation(
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

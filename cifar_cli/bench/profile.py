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

PROFILE_STEPS = 2  # profiled steps of the fast preset on a CPU (seconds each), after two untimed ones
CUDA_PROFILE_STEPS = 20  # on a GPU (milliseconds each): enough that the profiler's start does not dominate
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
    on_gpu = device.type == "cuda"
    steps = CUDA_PROFILE_STEPS if on_gpu else PROFILE_STEPS
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            candidate.step(*next(batches))
        sync(device)
    seconds = (time.perf_counter() - started) / steps
    batches.close()
    operators, device_seconds = operator_rows(profiler.key_averages(), steps, on_gpu)
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
        "operators": operators,
        # On a GPU: seconds per step its kernels and copies ran, against the step's wall time under the profiler
        # (`step_seconds`), which slows the host: compare with an unprofiled epoch before calling a step host-bound.
        "device_seconds_per_step": device_seconds,
        "device_busy_share": None if device_seconds is None else device_seconds / seconds,
    }


def operator_rows(events: Any, steps: int, on_gpu: bool) -> tuple[list[dict[str, Any]], float | None]:
    """The `PROFILE_TOP` operators of torch.profiler's `key_averages()` per step: by self time on the host, or on
    a GPU by self time on the device (where the GPU's seconds went), with both times; and the device's seconds per
    step in all, counted as torch's own table does (the kernels and copies, not again the operators that launched
    them; None on a CPU). Shares are of that total, or of the host's."""
    from torch.autograd import DeviceType

    def host(event: Any) -> float:
        return event.self_cpu_time_total / 1e6

    def gpu(event: Any) -> float:
        return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)) / 1e6

    def on_device(event: Any) -> bool:  # a kernel or copy as the GPU ran it; its launching operator counts it too
        return event.device_type != DeviceType.CPU and not getattr(event, "is_user_annotation", False)

    device_total = sum(gpu(event) for event in events if on_device(event))
    key = gpu if on_gpu else host
    total = (device_total if on_gpu else sum(host(event) for event in events)) or 1.0
    top = sorted(events, key=key, reverse=True)[:PROFILE_TOP]
    rows = [
        {
            "name": event.key,
            "calls": event.count // steps,
            "self_seconds_per_step": host(event) / steps,
            **({"device_seconds_per_step": gpu(event) / steps} if on_gpu else {}),
            "share": key(event) / total,
        }
        for event in top
    ]
    return rows, (device_total / steps if on_gpu else None)


# ---------------------------------------------------------------------------------------------- export runtimes

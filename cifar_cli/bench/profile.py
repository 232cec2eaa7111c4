"""`cifar bench --profile`: where the `fast` preset's step spends its time, operator by operator."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from cifar_cli.bench.measure import BenchOptions, Measurement, machine_facts, sync, utilisation
from cifar_cli.budget.flops import machine_ceiling, train_step_flops_per_image
from cifar_cli.config.sections import DataSettings
from cifar_cli.config.settings import Settings, load_settings
from cifar_cli.data import ensure_prepared
from cifar_cli.runtime.device import resolve_device
from cifar_cli.runtime.memory import keep_freed_memory

PROFILE_STEPS = 2  # profiled steps of the fast preset on a CPU (seconds each), after UNTIMED_STEPS
UNTIMED_STEPS = 2  # steps before the profiled ones (first-step allocations, kernel choices)
CUDA_PROFILE_STEPS = 20  # on a GPU (milliseconds each): enough that the profiler's start does not dominate
PROFILE_TOP = 15  # operators listed


def profile_fast_step(options: BenchOptions, data: DataSettings) -> dict[str, Any]:
    """Where the `fast` preset's training step spends its time here: operators by self time (torch.profiler) over
    `PROFILE_STEPS` steps of a real one-epoch `cifar train` run (the loop's own step: the batch drawn and augmented,
    forward and backward, the optimiser, the schedule, the epoch's counts), after two untimed steps, in the
    precision and layout the run chooses; with the step's utilisation. The run's files go to a temporary folder."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from cifar_cli.data.prepare import read_manifest
    from cifar_cli.train.run import Trainer

    device = resolve_device(options.device)
    if options.keep_freed_memory:
        keep_freed_memory(device.type)
    ensure_prepared(data)
    on_gpu = device.type == "cuda"
    steps = CUDA_PROFILE_STEPS if on_gpu else PROFILE_STEPS
    fast = load_settings(None, {"preset": "fast"})
    images = int((read_manifest(data.processed_dir) or {}).get("counts", {}).get("train", 0))
    batch = max(1, min(fast.train.batch_size, images // (UNTIMED_STEPS + steps + 1)))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    window = schedule(wait=0, warmup=UNTIMED_STEPS, active=steps, repeat=1)
    profiler = profile(activities=activities, schedule=window, acc_events=True)
    ends: list[float] = []

    def after_step() -> None:
        sync(device)  # each step's end on the clock; the profiler's window closes after `steps` of them
        ends.append(time.perf_counter())
        profiler.step()

    with tempfile.TemporaryDirectory(prefix="cifar-profile-") as folder:
        settings = _one_epoch_of_fast(data, str(device), batch, batch * (UNTIMED_STEPS + steps + 1), Path(folder))
        trainer = Trainer(settings)
        trainer.after_step = after_step
        with profiler:
            trainer.run()
    timed = ends[UNTIMED_STEPS : UNTIMED_STEPS + steps + 1]
    seconds = (timed[-1] - timed[0]) / (len(timed) - 1)
    operators, device_seconds = operator_rows(profiler.key_averages(), steps, on_gpu)
    images_per_second = batch / seconds
    flops = train_step_flops_per_image(fast.model.name, fast.model.width_multiplier)
    precision = trainer.precision.name
    return {
        "machine": machine_facts(device),
        "choice": f"{precision}{' + channels_last' if trainer.settings.train.channels_last else ''}",
        "batch_size": batch,
        "step_seconds": seconds,  # with the profiler's own overhead
        "images_per_second": images_per_second,
        "utilisation": utilisation(
            Measurement("fast", batch, images_per_second, 0.0, seconds, precision=precision, flops_per_image=flops),
            machine_ceiling(device),
        ),
        "operators": operators,
        # On a GPU: seconds per step its kernels and copies ran, against the step's wall time under the profiler
        # (`step_seconds`), which slows the host: compare with an unprofiled epoch before calling a step host-bound.
        "device_seconds_per_step": device_seconds,
        "device_busy_share": None if device_seconds is None else device_seconds / seconds,
    }


def _one_epoch_of_fast(data: DataSettings, device: str, batch: int, images: int, folder: Path) -> Settings:
    """`cifar train --preset fast --epochs 1` on `images` training images, nothing held out, no TTA or temperature
    at the end, its files in `folder`."""
    return load_settings(
        None,
        {
            "preset": "fast",
            "data": {"processed_dir": data.processed_dir, "train_subset": images, "val_size": 0},
            "train": {"epochs": 1, "batch_size": batch, "device": device, "tta": False, "calibrate": False,
                      "run_name": "profile", "resume": False},
            "log": {"checkpoint_dir": folder / "checkpoints", "log_dir": folder / "runs", "progress": "none",
                    "tensorboard": False},
        },
    )  # fmt: skip


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

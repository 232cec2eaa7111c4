"""Pick the device and the mixed-precision mode, with a clear error for a device this machine lacks."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from cifar_cli.errors import UsageError


@dataclass(frozen=True)
class Precision:
    name: str  # fp32, bf16 or fp16
    autocast_dtype: torch.dtype | None  # None: no autocast
    use_grad_scaler: bool  # fp16 needs loss scaling; bf16 has fp32's range and does not

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def resolve_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; asking for an absent device is a usage error (exit 2)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(
                f"Device {name!r} was requested but CUDA is not available on this machine.",
                hint="Use --device cpu (or auto), or install a CUDA build of torch on a machine with an NVIDIA GPU.",
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"Device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
        return device
    if name == "mps" and not _mps_available():
        raise UsageError("Device 'mps' was requested but Apple's MPS backend is not available here.")
    return torch.device(name)


def check_launch(name: str, processes: int) -> None:
    """Before torchrun starts anything: the device exists and has a GPU for every process (DDP runs one process
    per GPU); MPS has no multi-process backend."""
    device = resolve_device(name)
    if device.type == "cuda" and processes > torch.cuda.device_count():
        raise UsageError(
            f"--nproc {processes} asks for one GPU per process; this machine has {torch.cuda.device_count()}.",
            hint=f"Use --nproc {torch.cuda.device_count()} or fewer.",
        )
    if device.type == "mps":
        raise UsageError("Several processes on MPS are not supported.", hint="Drop --nproc.")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_precision(name: str, device: torch.device) -> Precision:
    """`auto`: bf16 on GPUs that support it, else fp16 with scaling; fp32 on a CPU.

    On a CPU, bf16 is 2-3x faster with AMX but 14-16x slower where it is emulated (AVX2), so training does not use
    this rule there: it measures (budget/probe.py). This is the fallback that never picks the slow case, for
    inference with a checkpoint that stored `auto`.
    """
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "mps":
            name = "fp16"
        else:
            name = "fp32"
    if name == "fp32":
        return Precision("fp32", None, False)
    if name == "bf16":
        return Precision("bf16", torch.bfloat16, False)
    if device.type == "cpu":
        raise UsageError("fp16 autocast is not supported for training on the CPU.", hint="Use --precision bf16.")
    return Precision("fp16", torch.float16, device.type == "cuda")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def synchronise(device: torch.device) -> None:
    """Wait until the device has finished its queued work (a CPU runs each operation as it is called)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def synchronised_clock(device: torch.device) -> float:
    """time.perf_counter() once the device has finished its queued work: the difference of two readings times the
    work in between, as CUDA events around the same span would (seconds)."""
    synchronise(device)
    return time.perf_counter()

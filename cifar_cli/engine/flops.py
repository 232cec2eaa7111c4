"""This machine's ceiling (FLOP/s of a large matrix multiply) and the FLOPs of a model's train step.

A step's utilisation is its FLOP/s (FLOPs per image x images/s) over the ceiling of its precision: how much of what
the cores can multiply the step turns into useful convolution and matrix work. FLOPs are counted the way
`torch.utils.flop_counter` counts them: matrix multiplies and convolutions (2 per multiply-add), forward and backward;
BatchNorm, activations and pooling count nothing, although they take time.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cifar_cli.models import build_model

MATMUL_SIZE = 2048  # a square matrix multiply this large runs at the kernel library's best rate
SCREEN_SIZE = 512  # a first, small multiply: where bf16 is emulated, a 2048 one would take a minute
MIN_SECONDS = 0.5  # each rate is timed over at least this long (seconds)
EMULATED = 0.5  # a precision whose small multiply runs under half fp32's rate is not timed at full size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matmul_rate(size: int, dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of `size` x `size` matrix multiplies, the first untimed."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    _sync(device)
    started, count = time.perf_counter(), 0
    while count < 2 or time.perf_counter() - started < MIN_SECONDS:
        a @ b
        count += 1
        _sync(device)
    return 2 * size**3 * count / (time.perf_counter() - started)


def machine_ceiling(device: torch.device) -> dict[str, float]:
    """FLOP/s of a large matrix multiply per precision: fp32, and the low precision this device offers."""
    low = "fp16" if device.type == "mps" else "bf16"
    dtypes = {"fp32": torch.float32, low: torch.bfloat16 if low == "bf16" else torch.float16}
    screen = {name: _matmul_rate(SCREEN_SIZE, dtype, device) for name, dtype in dtypes.items()}
    return {
        name: _matmul_rate(MATMUL_SIZE, dtype, device)
        if screen[name] >= EMULATED * screen["fp32"]
        else screen[name]
        for name, dtype in dtypes.items()
    }


def train_step_flops_per_image(name: str, width_multiplier: float = 1.0, batch: int = 8) -> float:
    """Forward + backward FLOPs of one image through the model (counted on the CPU in fp32 on a small batch; the
    count does not depend on the precision or the device)."""
    model = build_model(name, width_multiplier)
    init = getattr(model, "init_from_data", None)
    if init is not None:
        init(torch.randn(64, 3, 32, 32))
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    counter = FlopCounterMode(display=False)
    with counter:
        nn.functional.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops() / batch

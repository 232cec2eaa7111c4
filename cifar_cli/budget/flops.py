"""This machine's ceiling (FLOP/s of large matrix products) and the FLOPs of a model's train step.

The ceiling of a precision is the faster of a 2048 x 2048 matrix multiply (`torch.matmul`: MKL or OpenBLAS) and a
large 3x3 convolution in channels_last (oneDNN's implicit matrix product, the kernels the models run): on an AMD
EPYC Zen 4 the matrix multiply reached 166 GFLOP/s in fp32 and the convolution 239, so a matmul-only ceiling put
airbench's fp32 step above 100%.

A step's utilisation is its FLOP/s (FLOPs per image x images/s) over the ceiling of its precision: how much of what
the cores can multiply the step turns into useful convolution and matrix work. FLOPs are counted the way
`torch.utils.flop_counter` counts them: matrix multiplies and convolutions (2 per multiply-add), forward and backward;
BatchNorm, activations and pooling count nothing, although they take time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cifar_cli.models import build_model_for_measuring
from cifar_cli.runtime.device import synchronise

MATMUL_SIZE = 2048  # a square matrix multiply this large runs at the kernel library's best rate
CONV_SHAPE = (64, 256, 16)  # batch, channels in and out, height = width: 9.7 GFLOP per 3x3 convolution
SCREEN_SIZE = 512  # a first, small multiply: where bf16 is emulated, a 2048 one would take a minute
MIN_SECONDS = 0.5  # each rate is timed over at least this long (seconds)
EMULATED = 0.5  # a precision whose small multiply runs under half fp32's rate is not timed at full size


def _rate(operation: Callable[[], torch.Tensor], flops: float, device: torch.device) -> float:
    """FLOP/s of repeated `operation`s of `flops` each, the first untimed."""
    operation()
    synchronise(device)
    started, count = time.perf_counter(), 0
    while count < 2 or time.perf_counter() - started < MIN_SECONDS:
        operation()
        count += 1
        synchronise(device)
    return flops * count / (time.perf_counter() - started)


def _matmul_rate(size: int, dtype: torch.dtype, device: torch.device) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return _rate(lambda: a @ b, 2 * size**3, device)


def _conv_rate(dtype: torch.dtype, device: torch.device) -> float:
    batch, channels, side = CONV_SHAPE
    layout = torch.channels_last
    images = torch.randn(batch, channels, side, side, device=device).to(dtype).contiguous(memory_format=layout)
    weight = torch.randn(channels, channels, 3, 3, device=device).to(dtype).contiguous(memory_format=layout)
    flops = 2 * batch * side * side * channels * channels * 9
    return _rate(lambda: nn.functional.conv2d(images, weight, padding=1), flops, device)


def machine_ceiling(device: torch.device) -> dict[str, float]:
    """FLOP/s per precision of the faster of a large matrix multiply and a large convolution: fp32, and the low
    precision this device offers where it is faster than fp32. Where it is emulated (AVX2 CPUs: a 512 x 512 bf16
    multiply ran at 2 GFLOP/s against 100-200 in fp32) it has no ceiling, and its rows no utilisation."""
    low = "fp16" if device.type == "mps" else "bf16"
    dtypes = {"fp32": torch.float32, low: torch.bfloat16 if low == "bf16" else torch.float16}
    screen = {name: _matmul_rate(SCREEN_SIZE, dtype, device) for name, dtype in dtypes.items()}
    ceiling = {
        name: max(_matmul_rate(MATMUL_SIZE, dtype, device), _conv_rate(dtype, device))
        for name, dtype in dtypes.items()
        if screen[name] >= EMULATED * screen["fp32"]
    }
    return {name: rate for name, rate in ceiling.items() if name == "fp32" or rate > ceiling["fp32"]}


def train_step_flops_per_image(name: str, width_multiplier: float = 1.0, batch: int = 8) -> float:
    """Forward + backward FLOPs of one image through the model (counted on the CPU in fp32 on a small batch; the
    count does not depend on the precision or the device)."""
    model = build_model_for_measuring(name, width_multiplier, images=64)
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    counter = FlopCounterMode(display=False)
    with counter:
        nn.functional.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops() / batch

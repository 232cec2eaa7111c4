"""Forward and backward over one batch, whole or in micro-batches, shared by `cifar train` and `cifar bench`.

Micro-batches: the batch goes through the network in chunks whose gradients add up before the single optimiser step
(the gradient of the whole batch's mean loss; BatchNorm normalises each chunk with its own statistics). What for: a
batch larger than the device's memory holds at once. Not faster on our CPUs (docs/performance.md, "Measurements
behind the code"), so whole batches by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from cifar_cli.runtime.device import Precision

LossFunction = Callable[..., torch.Tensor]  # (logits, targets[, teacher's logits]) -> mean loss


def chunk_sizes(batch_size: int, micro_batch_size: int | None) -> list[int]:
    """Sizes of the chunks a batch is cut into: all `micro_batch_size` but a smaller last one."""
    chunk = micro_batch_size or batch_size
    return [min(chunk, batch_size - start) for start in range(0, batch_size, chunk)]


def forward_backward(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    loss_function: LossFunction,
    precision: Precision,
    scaler: torch.amp.GradScaler,
    micro_batch_size: int | None = None,
    teacher_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the gradients of the batch's mean loss into `.grad`; return that loss and the logits, detached.
    With `teacher_logits` (distillation), the loss is called as loss(logits, targets, teacher's logits).

    The caller zeroes the gradients before and steps the optimiser after.
    """
    sizes = chunk_sizes(len(targets), micro_batch_size)
    teacher_chunks = teacher_logits.split(sizes) if teacher_logits is not None else [None] * len(sizes)
    losses, logits_list = [], []
    chunks = zip(images.split(sizes), targets.split(sizes), teacher_chunks)
    for index, (chunk_images, chunk_targets, chunk_teacher) in enumerate(chunks):
        last = index == len(sizes) - 1
        with _skip_gradient_sync(model, not last):
            with precision.autocast(images.device):
                logits = model(chunk_images)
            taught = () if chunk_teacher is None else (chunk_teacher,)
            # A chunk's mean loss weighted by its share of the batch: the weighted sum is the batch's mean loss.
            loss = loss_function(logits.float(), chunk_targets, *taught) * (len(chunk_targets) / len(targets))
            scaler.scale(loss).backward()
        losses.append(loss.detach())
        logits_list.append(logits.detach())
    total_loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
    all_logits = logits_list[0] if len(logits_list) == 1 else torch.cat(logits_list)
    return total_loss, all_logits


def _skip_gradient_sync(model: nn.Module, skip: bool) -> AbstractContextManager[None]:
    """DistributedDataParallel all-reduces gradients in every backward; once per optimiser step is enough."""
    no_sync = getattr(model, "no_sync", None)
    if skip and no_sync is not None:
        return no_sync()
    return contextlib.nullcontext()

"""train/step.py: whole batches and micro-batches give the same gradient (without BatchNorm)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from cifar_cli.runtime.device import resolve_precision
from cifar_cli.train.step import chunk_sizes, forward_backward


@pytest.mark.parametrize(
    ("batch", "micro", "expected"),
    [(2000, 500, [500] * 4), (10, 4, [4, 4, 2]), (10, None, [10]), (10, 64, [10]), (1, 1, [1])],
)
def test_chunk_sizes(batch: int, micro: int | None, expected: list[int]) -> None:
    assert chunk_sizes(batch, micro) == expected


def _net() -> nn.Module:
    torch.manual_seed(0)
    # No BatchNorm or dropout: then a chunked batch must give the very same function and gradient.
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def _gradients(micro: int | None, images: torch.Tensor, targets: torch.Tensor):
    model = _net()
    precision = resolve_precision("fp32", torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.2)
    loss, logits = forward_backward(model, images, targets, criterion, precision, scaler, micro)
    return loss, logits, [p.grad.clone() for p in model.parameters()]


def test_micro_batches_accumulate_the_whole_batch_gradient() -> None:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(10, 3, 8, 8, generator=generator)
    targets = torch.randint(0, 10, (10,), generator=generator)
    whole_loss, whole_logits, whole_grads = _gradients(None, images, targets)
    # Chunks of 4, 4 and 2: the uneven last chunk must be weighted by its share of the batch.
    loss, logits, grads = _gradients(4, images, targets)
    torch.testing.assert_close(loss, whole_loss)
    torch.testing.assert_close(logits, whole_logits)
    assert not loss.requires_grad and not logits.requires_grad
    for chunked, whole in zip(grads, whole_grads):
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


class _CountingSync(nn.Module):
    """Stands in for DistributedDataParallel: records which backward passes ran inside no_sync()."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _net()
        self.synced: list[bool] = []
        self._in_no_sync = False

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self._in_no_sync = True
        try:
            yield
        finally:
            self._in_no_sync = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.synced.append(not self._in_no_sync)
        return self.inner(images)


def test_gradients_sync_once_per_step() -> None:
    model = _CountingSync()
    precision = resolve_precision("fp32", torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, targets = torch.randn(10, 3, 8, 8), torch.randint(0, 10, (10,))
    forward_backward(model, images, targets, nn.functional.cross_entropy, precision, scaler, 3)
    assert model.synced == [False, False, False, True]

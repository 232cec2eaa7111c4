"""One epoch of a run: the optimiser steps over the training loader with live numbers, then each epoch's evaluation."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from cifar_cli.data.spec import DataSpec
from cifar_cli.engine import distributed
from cifar_cli.engine.device import Precision
from cifar_cli.engine.distributed import DistContext
from cifar_cli.engine.evaluate import report_from_predictions
from cifar_cli.engine.inference import predict
from cifar_cli.engine.metrics import epoch_metrics
from cifar_cli.engine.optim import scheduler_steps_per_batch
from cifar_cli.engine.plan import RemainingTime
from cifar_cli.engine.run_state import Progress
from cifar_cli.engine.setup import Loaders, Parts
from cifar_cli.engine.step import forward_backward
from cifar_cli.errors import CifarError
from cifar_cli.settings import Settings
from cifar_cli.tracking import Reporter

PROGRESS_UPDATES_PER_EPOCH = 50  # batch-bar refreshes; each one waits for the device


class EpochRunner:
    """Trains one epoch at a time and returns its record (the numbers of every process, the evaluation's)."""

    def __init__(
        self,
        parts: Parts,
        loaders: Loaders,
        settings: Settings,
        spec: DataSpec,
        precision: Precision,
        device: torch.device,
        context: DistContext,
        reporter: Reporter,
        epoch_split: str,
    ) -> None:
        self.parts, self.loaders, self.settings, self.spec = parts, loaders, settings, spec
        self.precision, self.device, self.context, self.reporter = precision, device, context, reporter
        self.epoch_split = epoch_split  # "val", or "test" where the recipe holds nothing out (curves only)

    def run(self, progress: Progress, remaining: RemainingTime) -> dict[str, Any]:
        """Train and evaluate epoch `progress.epoch + 1`; advances `progress.global_step`."""
        epoch = progress.epoch + 1
        self.reporter.start_epoch(epoch, self.settings.train.epochs, len(self.loaders.train))
        remaining.start_epoch()
        started = time.perf_counter()
        train_stats = self._train(progress, remaining)
        seconds = time.perf_counter() - started
        evaluated = predict(
            self.parts.model, self.loaders.evaluation, self.precision, self.device, tta_level=0
        )
        report = report_from_predictions(evaluated, list(self.spec.class_names))
        images_seen = len(self.loaders.train) * self.settings.train.batch_size * self.context.world_size
        split = self.epoch_split
        return {
            "epoch": epoch,
            **{f"train_{key}": value for key, value in train_stats.items()},
            f"{split}_loss": evaluated.loss,
            f"{split}_accuracy": report.accuracy,
            f"{split}_precision": report.precision_macro,
            f"{split}_recall": report.recall_macro,
            f"{split}_f1": report.f1_macro,
            "lr": self.parts.optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "images_per_second": images_seen / seconds,
            "step": progress.global_step,
        }

    def _train(self, progress: Progress, remaining: RemainingTime) -> dict[str, float]:
        parts, loader = self.parts, self.loaders.train
        loader.set_epoch(progress.epoch)
        if hasattr(parts.model, "whiten_bias_trainable"):
            parts.model.whiten_bias_trainable = progress.epoch < self.settings.model.whiten_bias_epochs
        parts.train_model.train()
        metrics = epoch_metrics(self.spec.num_classes, self.device)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        steps_per_batch = scheduler_steps_per_batch(parts.scheduler)
        refresh_every = max(1, len(loader) // PROGRESS_UPDATES_PER_EPOCH)
        started = time.perf_counter()
        for batch_index, (images, targets) in enumerate(loader, start=1):
            loss, logits = self._step(images, targets)
            if steps_per_batch:
                parts.scheduler.step()
            progress.global_step += 1
            if parts.lookahead is not None:
                parts.lookahead.maybe_sync(parts.model, progress.global_step, parts.total_steps)
            loss_sum += loss
            predicted = logits.argmax(dim=1)
            metrics.update(predicted, targets)
            correct += (predicted == targets).sum()
            if batch_index % refresh_every == 0 or batch_index == len(loader):
                self._check_finite(loss_sum, progress.epoch + 1, batch_index)
                self._report_batch(batch_index, loss_sum, correct, started, remaining)
        totals = distributed.all_reduce_sum(
            torch.stack([loss_sum, torch.tensor(float(len(loader)), device=self.device)])
        )
        computed = {key: float(value) for key, value in metrics.compute().items()}
        if parts.lookahead is not None and progress.epoch + 1 == self.settings.train.epochs:
            parts.lookahead.finish(parts.model)  # the last epoch ends on the averaged weights
        return {"loss": float(totals[0] / totals[1]), **computed}

    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on the batch; returns its mean loss and the logits, detached."""
        parts = self.parts
        parts.optimizer.zero_grad(set_to_none=True)
        loss, logits = forward_backward(
            parts.train_model, images, targets, parts.criterion, self.precision, parts.scaler,
            self.settings.train.micro_batch_size,
        )  # fmt: skip
        if self.settings.optim.grad_clip:
            parts.scaler.unscale_(parts.optimizer)
            nn.utils.clip_grad_norm_(parts.model.parameters(), self.settings.optim.grad_clip)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        return loss, logits

    @staticmethod
    def _check_finite(loss_sum: torch.Tensor, epoch: int, batch_index: int) -> None:
        if not math.isfinite(float(loss_sum)):
            raise CifarError(
                f"The loss became {float(loss_sum)} in epoch {epoch} by batch {batch_index}; training stopped.",
                hint="Lower the learning rate (--lr), enable --set optim.grad_clip=1.0, or use --precision fp32.",
            )

    def _report_batch(
        self,
        done: int,
        loss_sum: torch.Tensor,
        correct: torch.Tensor,
        started: float,
        remaining: RemainingTime,
    ) -> None:
        """Live numbers of this process's batches so far (the epoch record holds the all-rank values)."""
        elapsed = max(time.perf_counter() - started, 1e-9)
        batch_size = self.settings.train.batch_size
        self.reporter.update_batch(
            done,
            {
                "loss": float(loss_sum) / done,
                "accuracy": float(correct) / (done * batch_size),
                "lr": self.parts.optimizer.param_groups[0]["lr"],
                "images_per_second": done * batch_size * self.context.world_size / elapsed,
                "remaining_seconds": remaining.during_epoch(done),
            },
        )

"""One epoch of a run: the optimiser steps over the training loader with live numbers, then each epoch's evaluation."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cifar_cli.budget.plan import RemainingTime
from cifar_cli.config.settings import Settings
from cifar_cli.data.spec import DataSpec
from cifar_cli.errors import CifarError
from cifar_cli.predict.inference import predict
from cifar_cli.predict.metrics import count_into, report_from_predictions, scores_from_confusion
from cifar_cli.recipe.distill import Teacher
from cifar_cli.recipe.mixing import BatchMixer
from cifar_cli.recipe.optim import scheduler_steps_per_batch
from cifar_cli.runtime import distributed
from cifar_cli.runtime.device import Precision
from cifar_cli.runtime.distributed import DistContext
from cifar_cli.runtime.stopping import StopFlag
from cifar_cli.train.setup import Loaders, Parts
from cifar_cli.train.state import PartialEpoch, Progress
from cifar_cli.train.step import forward_backward
from cifar_cli.train.tracking import Reporter

# Seconds (on the run's clock) between refreshes of the live numbers, the finite-loss check, the budget's refit and
# the deadline check: the only points where a step reads a value back from the device (and the epoch's end).
REFRESH_SECONDS = 0.5
# Processes of a multi-process run agree whether a stop signal arrived every this many batches (one small
# all-reduce): each may have received it at another step, and all must save the same one.
STOP_CHECK_BATCHES = 10


class StoppedMidEpoch(Exception):
    """A stop signal ended the epoch at a step boundary; `partial` is what a resume needs to go on from there."""

    def __init__(self, partial: PartialEpoch) -> None:
        super().__init__(f"stopped after batch {partial.batches} of epoch {partial.epoch}")
        self.partial = partial


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
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.parts, self.loaders, self.settings, self.spec = parts, loaders, settings, spec
        self.precision, self.device, self.context, self.reporter = precision, device, context, reporter
        self.epoch_split = epoch_split  # "val", or "test" where the recipe holds nothing out (curves only)
        self.clock = clock  # seconds; a test's fake clock can stand in
        self.mixer = BatchMixer.from_settings(settings.train.augment, spec.num_classes)  # mixup / cutmix, or None
        self.teacher: Teacher | None = None  # distillation: set by the trainer
        self.after_step: Callable[[], None] | None = None  # called after each step (`cifar bench --profile`)
        self.stop: StopFlag | None = None  # set by a stop signal: the epoch ends at the next step boundary

    def run(
        self,
        progress: Progress,
        remaining: RemainingTime,
        steps: int | None = None,
        deadline: float | None = None,
        refit: Callable[[int], int | None] | None = None,
    ) -> dict[str, Any]:
        """Train and evaluate epoch `progress.epoch + 1`, `steps` steps of it (default: all); advances
        `progress.global_step`. Past `deadline` (on `clock`), the epoch ends early, so that a run whose machine
        slowed down still ends inside its time budget with a saved, evaluated model; `refit` may move the
        epoch's end as it goes (see `_train`)."""
        epoch = progress.epoch + 1
        steps = min(steps or len(self.loaders.train), len(self.loaders.train))
        self.reporter.start_epoch(epoch, self.settings.train.epochs, steps)
        remaining.start_epoch()
        started = self._epoch_started = self.clock()
        train_stats, steps_done, steps = self._train(progress, remaining, steps, deadline, refit)
        seconds = self.clock() - started + self.earlier_seconds
        evaluated = predict(
            self.parts.evaluated_model, self.loaders.evaluation, self.precision, self.device, tta_level=0
        )
        report = report_from_predictions(evaluated, list(self.spec.class_names))
        eval_seconds = self.clock() - started - (seconds - self.earlier_seconds)
        images_seen = self.loaders.train.images_in(steps_done) * self.context.world_size
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
            "eval_seconds": eval_seconds,
            "images_per_second": images_seen / max(seconds, 1e-9),
            "step": progress.global_step,
            "steps": steps_done,
            **({"cut_short": True} if steps_done < steps else {}),
        }

    def _train(
        self,
        progress: Progress,
        remaining: RemainingTime,
        steps: int,
        deadline: float | None,
        refit: Callable[[int], int | None] | None,
    ) -> tuple[dict[str, float], int, int]:
        """The epoch's steps; `refit(steps done)` may move its end at each refresh point (a time budget).
        Returns the statistics, the steps done and the steps the epoch was to have."""
        parts, loader = self.parts, self.loaders.train
        loader.set_epoch(progress.epoch)
        if hasattr(parts.model, "whiten_bias_trainable"):
            parts.model.whiten_bias_trainable = progress.epoch < self.settings.model.whiten_bias_epochs
        if parts.freezer is not None:
            parts.freezer.set_epoch(progress.epoch)
        parts.train_model.train()
        classes = self.spec.num_classes
        # The epoch's statistics stay on the device until a refresh reads them (true x predicted counts).
        confusion = torch.zeros(classes * classes, dtype=torch.long, device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        batch_index = done_before = self._resume_partial(progress, confusion, loss_sum)
        steps_per_batch = scheduler_steps_per_batch(parts.scheduler)
        started = time.perf_counter() - self.earlier_seconds  # the live pace counts a resumed epoch's first part
        self._checked = (self.clock(), done_before)  # (clock, batches) at the last deadline check
        refreshed = self.clock()
        for batch_index, (images, targets) in enumerate(loader, start=done_before + 1):
            loss, logits = self._step(images, targets)
            if steps_per_batch:
                parts.scheduler.step()
            progress.global_step += 1
            if parts.lookahead is not None:
                parts.lookahead.maybe_sync(parts.model, progress.global_step, parts.total_steps)
            if parts.ema is not None:
                parts.ema.update(parts.model, progress.global_step)
            loss_sum += loss
            count_into(confusion, logits.argmax(dim=1), targets)
            if self.after_step is not None:
                self.after_step()
            if batch_index == steps or self.clock() - refreshed >= REFRESH_SECONDS:
                refreshed = self.clock()
                self._refresh(progress.epoch + 1, batch_index, loss_sum, confusion, started, remaining)
                if refit is not None and (new_steps := refit(batch_index)) is not None:
                    steps = max(batch_index, min(new_steps, len(loader)))
                if batch_index < steps and self._past(deadline, batch_index):
                    break
            if batch_index == steps:
                break
            if self._stop_agreed(batch_index):
                raise StoppedMidEpoch(self._partial(progress, batch_index, steps, loss_sum, confusion))
        totals = distributed.all_reduce_sum(
            torch.stack([loss_sum, torch.tensor(float(batch_index), device=self.device)])
        )
        computed = scores_from_confusion(distributed.all_reduce_sum(confusion))  # every process's images
        # The run's last epoch, planned or cut short by the clock, ends on the averaged weights (early stopping,
        # decided after the evaluation, hands them back in the trainer).
        if parts.lookahead is not None and (progress.epoch + 1 == self.settings.train.epochs or batch_index < steps):
            parts.lookahead.finish(parts.model)
        return {"loss": float(totals[0] / totals[1]), **computed}, batch_index, steps

    def _resume_partial(self, progress: Progress, confusion: torch.Tensor, loss_sum: torch.Tensor) -> int:
        """Where a signal stopped this epoch before (its loader's streams, its numbers so far): the batches done."""
        partial, progress.partial = progress.partial, None
        self.earlier_seconds = 0.0
        if partial is None or partial.epoch != progress.epoch + 1:
            return 0
        self.loaders.train.resume_at(partial.batches, partial.generator_states)
        confusion.copy_(torch.tensor(partial.confusion))
        loss_sum.fill_(partial.loss_sum)
        self.earlier_seconds = partial.seconds
        return partial.batches

    def _stop_agreed(self, batch_index: int) -> bool:
        """Whether a stop signal ends the epoch after this batch: this process's flag, or, with several, whether
        any of them has one (every STOP_CHECK_BATCHES batches, so that all stop after the same batch)."""
        requested = self.stop is not None and self.stop.requested
        if not self.context.enabled:
            return requested
        if batch_index % STOP_CHECK_BATCHES:
            return False
        flags = distributed.all_reduce_sum(torch.tensor([float(requested)], device=self.device))
        return bool(flags.item() > 0)

    def _partial(
        self, progress: Progress, batches: int, steps: int, loss_sum: torch.Tensor, confusion: torch.Tensor
    ) -> PartialEpoch:
        return PartialEpoch(
            epoch=progress.epoch + 1,
            batches=batches,
            steps=steps,
            loss_sum=float(loss_sum),
            confusion=confusion.tolist(),
            seconds=self.earlier_seconds + self.clock() - self._epoch_started,
            generator_states=self.loaders.train.generator_states(),
        )

    def _past(self, deadline: float | None, batches: int) -> bool:
        """Whether the next batch would end past `deadline`, at the pace of the batches since the last check.
        Every process stops at the same batch: rank 0's clock decides."""
        if deadline is None:
            return False
        now, (then, batches_then) = self.clock(), self._checked
        self._checked = (now, batches)
        per_batch = (now - then) / max(batches - batches_then, 1)
        return bool(distributed.broadcast_from_main(now + per_batch >= deadline))

    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on the batch; returns its mean loss and the logits, detached."""
        parts = self.parts
        parts.optimizer.zero_grad(set_to_none=True)
        loss_targets = targets
        if self.mixer is not None:  # soft targets; the batch statistics still count each image's own label
            images, loss_targets = self.mixer(images, targets)
        teacher, drawn = self.teacher, self.loaders.train.last_batch
        teacher_logits = teacher.batch_logits(images, self.spec, drawn) if teacher is not None else None
        loss, logits = forward_backward(
            parts.train_model,
            images,
            loss_targets,
            parts.criterion,
            self.precision,
            parts.scaler,
            self.settings.train.micro_batch_size,
            teacher_logits,
        )
        if parts.freezer is not None:
            parts.freezer.after_backward()
        if self.settings.optim.grad_clip:
            parts.scaler.unscale_(parts.optimizer)
            nn.utils.clip_grad_norm_(parts.model.parameters(), self.settings.optim.grad_clip)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        return loss, logits

    @staticmethod
    def _check_finite(loss_sum: float, epoch: int, batch_index: int) -> None:
        if not math.isfinite(loss_sum):
            raise CifarError(
                f"The loss became {loss_sum} in epoch {epoch} by batch {batch_index}; training stopped.",
                hint="Lower the learning rate (--lr), enable --set optim.grad_clip=1.0, or use --precision fp32.",
            )

    def _refresh(
        self,
        epoch: int,
        done: int,
        loss_sum: torch.Tensor,
        confusion: torch.Tensor,
        started: float,
        remaining: RemainingTime,
    ) -> None:
        """Live numbers of this process's batches so far (the epoch record holds the all-rank values), read back
        from the device at once, and the check that the loss is still finite."""
        elapsed = max(time.perf_counter() - started, 1e-9)
        classes = self.spec.num_classes
        correct = confusion.view(classes, classes).diagonal().sum()
        loss_total, right, seen = torch.stack([loss_sum.float(), correct.float(), confusion.sum().float()]).tolist()
        self._check_finite(loss_total, epoch, done)
        self.reporter.update_batch(
            done,
            {
                "loss": loss_total / done,
                "accuracy": right / max(seen, 1.0),
                "lr": self.parts.optimizer.param_groups[0]["lr"],
                "images_per_second": self.loaders.train.images_in(done) * self.context.world_size / elapsed,
                "remaining_seconds": remaining.during_epoch(done),
            },
        )

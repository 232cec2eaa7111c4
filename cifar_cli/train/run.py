"""A training run from top to bottom: set up (train/setup.py), plan (train/planning.py), train epoch by epoch
(train/loop.py), checkpoint (train/state.py), and score the last weights once (train/report.py)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import Any

import torch

from cifar_cli.budget.keeper import BudgetKeeper
from cifar_cli.budget.plan import RemainingTime, RunPlan, count
from cifar_cli.config.settings import Settings, dump_yaml, fits_temperature, resolve_val_size
from cifar_cli.data import adopt_prepared, ensure_prepared
from cifar_cli.data.prepare import read_manifest
from cifar_cli.errors import TrainingInterrupted
from cifar_cli.files import ensure_writable_folder, run_lock, stop_signals_deferred, write_text_atomically
from cifar_cli.models.pretrained import Pretrained, checked_weights
from cifar_cli.predict.inference import checkpoint_spec
from cifar_cli.recipe.optim import scheduler_steps_per_batch
from cifar_cli.runtime import distributed, ranks, stopping
from cifar_cli.runtime.device import synchronised_clock
from cifar_cli.runtime.distributed import DistContext
from cifar_cli.train import state as run_state
from cifar_cli.train.finetune import describe_start, match_source, read_source
from cifar_cli.train.identity import default_run_name, hparams, provenance
from cifar_cli.train.loop import EpochRunner, StoppedMidEpoch
from cifar_cli.train.planning import RunPlanning
from cifar_cli.train.report import TrainResult, describe_final, final_evaluation, run_banner
from cifar_cli.train.setup import (
    Loaders,
    Parts,
    Splits,
    build_loaders,
    build_parts,
    check_small_images,
    data_spec,
    load_splits,
    seed_everything,
    setup_device,
)
from cifar_cli.train.state import BEST_CHECKPOINT, LAST_CHECKPOINT, PartialEpoch, Progress
from cifar_cli.train.tracking import REQUEST_FILE, NullReporter, Reporter, RunLogger

FigureMaker = Callable[[list[list[int]], list[str]], Any]  # (confusion matrix, class names) -> a figure
PLAN_FILE = "plan.json"
PATH_SETTINGS = (("data", "processed_dir"), ("data", "raw_data_dir"), ("log", "checkpoint_dir"), ("log", "log_dir"))


class Trainer(RunPlanning):
    """One training run: `run()` sets up, plans, trains epoch by epoch and reports; `dry_run()` only plans."""

    def __init__(
        self,
        settings: Settings,
        reporter: Reporter | None = None,
        context: DistContext | None = None,
        confusion_figure: FigureMaker | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.clock = clock  # seconds; a test's fake clock can stand in
        self.started = clock()  # a time budget counts from here
        self.settings = settings.model_copy(deep=True)  # the plan fills in precision, layout, epochs, width
        # Which data is prepared is part of the recipe.
        self.settings.data = adopt_prepared(self.settings.data)
        if self.settings.train.init_from is not None:
            self.settings.train.init_from = self.settings.train.init_from.absolute()
        if self.settings.train.distill.teacher is not None:
            self.settings.train.distill.teacher = self.settings.train.distill.teacher.absolute()
        for section, name in PATH_SETTINGS:  # stored absolute: commands run elsewhere find the run's data
            setattr(getattr(self.settings, section), name, getattr(getattr(settings, section), name).absolute())
        # What the user asked for, kept apart from what the plan fills in: the run's identity and what a resume
        # is checked against (the plan's choices are read back from the checkpoint's settings).
        self.request = self.settings.model_copy(deep=True)
        self.context = context or distributed.context_from_env()
        self.reporter = reporter if reporter is not None and self.context.is_main else NullReporter()
        self.confusion_figure = confusion_figure  # the CLI passes plots' figure; the core draws nothing itself
        self.run_name = settings.train.run_name or default_run_name(self.settings)
        self.run_dir = settings.log.log_dir / self.run_name
        self.checkpoint_dir = settings.log.checkpoint_dir / self.run_name
        self.progress = Progress()
        # The epoch last.pth holds (an interrupt between an epoch and its save must not claim more), and the
        # seconds the last epoch's checkpoints and logs took.
        self.saved_epoch, self.save_seconds = 0, 0.0
        self.saved_partial: PartialEpoch | None = None  # the part of the next epoch last.pth holds
        self.stop = stopping.StopFlag()  # a stop signal during training: the run saves at the next step boundary
        self.teacher, self.teacher_cost = None, 0.0  # distillation's teacher and its seconds per image
        self.pretrained: Pretrained | None = None  # a torchvision model's pretrained weights (models/pretrained.py)
        self.temperature: dict[str, Any] | None = None  # fitted at the end (train.calibrate), saved in last.pth
        self.after_step: Callable[[], None] | None = None  # called after each training step (a profiler's)
        self.last = run_state.ResumePoint(self.checkpoint_dir, settings.train.resume, self.context, lambda: self.device)

    # ------------------------------------------------------------------------------------------ the run
    def run(self) -> TrainResult:
        if self.context.is_main:
            # Fail now, not after the first epoch, when a folder cannot be written or the disk is full.
            ensure_writable_folder(self.checkpoint_dir, probe=True)
            ensure_writable_folder(self.run_dir, probe=True)
        # One process owns a run: a second `cifar train` of the same run is refused with the owner's PID.
        owned = [self.checkpoint_dir, self.run_dir] if self.context.is_main else []
        with run_lock(owned, self.run_name):
            seed_everything(self.settings.train.seed, self.settings.train.deterministic)
            self.device = setup_device(self.settings.train, self.context)
            try:
                distributed.init_process_group(self.context, self.device)
                return self._run()
            finally:
                distributed.destroy_process_group()

    def _run(self) -> TrainResult:
        resuming = self.last.resuming
        if resuming and self.settings.rungs:  # a budget run resumes on the rung its plan chose
            self._adopt_rung(self.last.state["settings"].get("preset", self.settings.preset))
        if resuming:
            run_state.check_same_recipe(self.last.state, self.request, self.settings, self.run_name)
        # A fine-tuning run starts from another checkpoint's weights, unless it resumes from its own.
        init_from = self.settings.train.init_from
        self.source = None if resuming or init_from is None else read_source(init_from)
        splits = ranks.on_every_rank(self._load_data)  # a node without the data stops every node, named
        ranks.same_on_every_rank(
            ranks.manifest_fingerprint(read_manifest(self.settings.data.processed_dir)),
            "The prepared data",
            self.settings.data.processed_dir,
        )
        if self.source is not None:
            match_source(self.source, self.settings.model, self.spec.class_names)
        if self._fresh_pretrained():  # checked before any measurement, loaded into the model built for training
            model = self.settings.model
            self.pretrained = checked_weights(model.name, model.weights, self.spec.num_classes)
        check_small_images(self.settings, self.device.type, self.spec.num_classes)
        self.teacher, self.teacher_cost = self._ready_teacher(splits.train[0])
        self.run_plan = self.plan(len(splits.train[1]), len(splits.evaluation[1]), len(splits.test[1]))
        self.loaders: Loaders = build_loaders(
            splits, self.settings.train, self.spec, self.precision, self.device, self.context
        )
        started = synchronised_clock(self.device)
        self.parts: Parts = build_parts(
            self.settings,
            self.spec,
            self.loaders.train,
            self.device,
            self.precision,
            self.context,
            self.source,
            self.pretrained,
        )
        if self.parts.started_from is not None:
            self.reporter.message(describe_start(self.parts.started_from, self.settings.train.freeze_epochs))
        self.init_seconds = synchronised_clock(self.device) - started  # the whitening init's share, for bench
        if resuming:
            self.progress = run_state.restore(self.parts, self.last.state, self.context.rank)
            self.saved_epoch, self.saved_partial = self.progress.epoch, self.progress.partial
            partial = self.progress.partial
            within = f", at step {partial.batches} of epoch {partial.epoch}" if partial is not None else ""
            self.reporter.message(
                f"Resuming run {self.run_name} after epoch {self.progress.epoch}{within} ({LAST_CHECKPOINT})."
            )
        resumed_from = self.progress.epoch
        if self.context.is_main:
            run_state.check_checkpoint_space(
                self.checkpoint_dir, self.epoch_split == "val", self.parts, self.settings.optim.name
            )
        if resumed_from >= self.settings.train.epochs:
            self.reporter.message(
                f"Run {self.run_name} has already finished {count(resumed_from, 'epoch')}: nothing to train. "
                "Use --no-resume to train it again, or raise --epochs to extend it."
            )
            # Nothing is written: no logger, so no stray TensorBoard events file and no open writer.
            return self._result({}, resumed_from, stopped_early=False)
        if resuming and self.last.state.get("temperature") and not fits_temperature(self.settings):
            self.reporter.message(run_state.DROPPED_TEMPERATURE)
        with stopping.deferred(self.stop):  # a stop signal from here on: saved at the next step boundary
            return self._train(resumed_from)

    def _train(self, resumed_from: int) -> TrainResult:
        # A resumed budget run trains the epochs its last plan chose; a fresh one keeps its budget as it goes.
        budget = BudgetKeeper(
            self.run_plan, self.clock, self.started, resumed_from == 0, len(self.loaders.evaluation.labels)
        )
        logger = None
        if self.context.is_main:
            logger = RunLogger(self.run_dir, dump_yaml(self.settings), self.settings.log.tensorboard)
            write_text_atomically(self.run_dir / REQUEST_FILE, dump_yaml(self.request))
            write_text_atomically(self.run_dir / PLAN_FILE, json.dumps(budget.to_json(), indent=2))
        self.reporter.message(
            run_banner(
                self.run_name,
                self.settings,
                self.loaders,
                self.epoch_split,
                self.device,
                self.precision,
                self.context,
                teacher_cached=self.teacher is not None and self.teacher.cached is not None,
            )
        )
        runner = EpochRunner(
            self.parts,
            self.loaders,
            self.settings,
            self.spec,
            self.precision,
            self.device,
            self.context,
            self.reporter,
            self.epoch_split,
            self.clock,
        )
        runner.teacher, runner.after_step, runner.stop = self.teacher, self.after_step, self.stop
        remaining = RemainingTime(self.run_plan, self.progress.epoch)
        stopped_early = False
        try:
            # One epoch, in order: its steps and evaluation (loop.py, which may refit its length to the budget as it
            # goes), the budget re-planned, checkpoints and logs written, this machine's speed learned.
            while self.progress.epoch < self.settings.train.epochs and not stopped_early:
                started = self.clock()
                epoch = self.progress.epoch + 1

                def refit(done: int, epoch: int = epoch, started: float = started) -> int | None:
                    steps = budget.refit_during_epoch(epoch, done, started, self.progress.global_step, self.parts)
                    # The loop, the display and lookahead follow the plan.
                    self.settings.train.epochs = budget.plan.epochs
                    return steps

                try:
                    record = runner.run(self.progress, remaining, budget.steps(epoch), budget.deadline(), refit)
                except StoppedMidEpoch as stopped:  # a stop signal, at a step boundary: saved where it stopped
                    self.progress.partial = stopped.partial
                    every_rank = distributed.gather_objects(stopped.partial.to_state())
                    if self.context.is_main:
                        self._save(LAST_CHECKPOINT, every_rank if self.context.enabled else None)
                    distributed.barrier()
                    raise self._stopped(self.stop.signum) from None
                # The plan first, so that this epoch's checkpoint holds the epochs now planned; the epoch's time
                # counts the previous epoch's checkpoint and logs in place of its own, still to come.
                self._keep_budget(budget, record, self.clock() - started + self.save_seconds, remaining, logger)
                saving = self.clock()
                stopped_early = self._after_epoch(record, logger, remaining) or bool(record.get("cut_short"))
                self.save_seconds = self.clock() - saving
                # One process, no compile: other runs' speeds are another machine's, as far as the cache can tell.
                # ... and no teacher: its passes are not this model's speed.
                alone = self.context.is_main and not (self.context.enabled or self.settings.train.compile)
                alone = alone and self.teacher is None
                budget.learn_speed(record, alone)
                if self._stop_agreed() and not stopped_early and self.progress.epoch < self.settings.train.epochs:
                    raise self._stopped(self.stop.signum)  # between epochs: last.pth holds the one just done
            # A stop signal during the final evaluation waits for it: the run is then complete.
            final_metrics = self._finish(logger)
        except KeyboardInterrupt as interrupt:  # a second Ctrl-C, or a signal outside the steps
            raise self._stopped(getattr(interrupt, "signum", signal.SIGINT)) from None
        finally:
            self.reporter.close()
            if logger is not None:
                logger.close()
        return self._result(final_metrics, resumed_from, stopped_early)

    def _stop_agreed(self) -> bool:
        """After an epoch: whether a stop signal arrived (in any process of a multi-process run)."""
        if not self.context.enabled:
            return self.stop.requested
        flags = distributed.all_reduce_sum(torch.tensor([float(self.stop.requested)], device=self.device))
        return bool(flags.item() > 0)

    def _stopped(self, signum: int | None) -> TrainingInterrupted:
        """What a stop says: the signal, what last.pth holds, how to resume; under SLURM, whether to requeue."""
        cause = "Interrupted" if signum in (None, signal.SIGINT) else f"Stopped by {stopping.signal_name(signum)}"
        held = f"{LAST_CHECKPOINT} holds epoch {self.saved_epoch} of run {self.run_name}"
        if self.saved_partial is not None:
            partial = self.saved_partial
            held += f", and {partial.batches} of epoch {partial.epoch}'s {partial.steps} steps"
        return TrainingInterrupted(
            f"{cause}. {held}.",
            hint=f"Resume with: cifar train --run-name {self.run_name} (plus the same options as before).",
            requeue=stopping.asks_requeue(signum, self.settings.train.requeue_signal),
        )

    def _keep_budget(
        self,
        budget: BudgetKeeper,
        record: dict[str, Any],
        seconds: float,
        remaining: RemainingTime,
        logger: RunLogger | None,
    ) -> None:
        """The epochs left refit to the measured speed (budget runs); the plan everything else reads follows."""
        message = budget.after_epoch(record, seconds, record["epoch"], self.progress.global_step, self.parts)
        if budget.plan is not self.run_plan:
            self.run_plan = remaining.plan = budget.plan
            self.settings.train.epochs = budget.plan.epochs
            if logger is not None:
                write_text_atomically(self.run_dir / PLAN_FILE, json.dumps(budget.to_json(), indent=2))
                logger.write_settings(dump_yaml(self.settings))
        if message is not None:
            self.reporter.message(message)

    def _result(self, final_metrics: dict[str, Any], resumed_from: int, stopped_early: bool) -> TrainResult:
        return TrainResult(
            self.run_name,
            self.run_dir,
            self.checkpoint_dir,
            self.progress.history,
            final_metrics,
            resumed_from,
            stopped_early,
            self.run_plan,
        )

    # ------------------------------------------------------------------------------------------ data
    def _load_data(self) -> Splits:
        """Training images, the validation split held out of them (when the recipe has one) and the test split."""
        ensure_prepared(self.settings.data, self.reporter.message)
        resumed = checkpoint_spec(self.last.state) if self.last.resuming else None
        trained = resumed or getattr(self.source, "spec", None)  # the input statistics the weights were trained with
        self.spec = data_spec(self.settings.data, self.settings.model.name, trained, self._fresh_pretrained())
        splits = load_splits(self.settings.data, self._resolve_val_size, self.settings.train.seed)
        self.epoch_split = splits.epoch_split
        return splits

    def _fresh_pretrained(self) -> bool:
        """A torchvision model's pretrained weights are loaded (a resume's weights are its checkpoint's)."""
        return self.settings.model.weights is not None and not self.last.resuming

    def _resolve_val_size(self, train_images: int) -> int:
        """auto -> a number, stored in the run's settings (a resumed run keeps its checkpoint's split)."""
        stored = self.last.settings
        val_size = stored["data"]["val_size"] if stored is not None else resolve_val_size(self.settings, train_images)
        self.settings.data.val_size = val_size
        return val_size

    # ------------------------------------------------------------------------------------------ each epoch
    def _after_epoch(self, record: dict[str, Any], logger: RunLogger | None, remaining: RemainingTime) -> bool:
        """Bookkeeping after an epoch; returns True when early stopping says to stop."""
        progress, parts = self.progress, self.parts
        progress.epoch = record["epoch"]
        progress.history.append(record)
        stopping = self.settings.train.early_stopping
        # A monitor on the test split is never read: without a validation split there is no val_* to monitor.
        # Rank 0's value decides for every rank (best.pth, the plateau scheduler's lr, early stopping), so the
        # processes of a DDP run can never disagree about when to stop.
        monitored = distributed.broadcast_from_main(record.get(stopping.monitor))
        best = progress.best_metric
        improved = monitored is not None and (
            best is None or (monitored > best if stopping.mode == "max" else monitored < best)
        )
        if improved:
            progress.best_metric, progress.epochs_without_improvement = monitored, 0
        elif monitored is not None:
            progress.epochs_without_improvement += 1
        if parts.scheduler is not None and not scheduler_steps_per_batch(parts.scheduler):
            parts.scheduler.step(monitored)
        stop = bool(stopping.patience) and progress.epochs_without_improvement >= stopping.patience
        if stop and parts.lookahead is not None:  # the weights kept and scored at the end: the averaged ones
            parts.lookahead.finish(parts.model)
        if self.context.is_main:
            self._save(LAST_CHECKPOINT)
            if improved and self.epoch_split == "val":  # best.pth: only where a validation split chose it
                self._save(BEST_CHECKPOINT)
            logger.log_epoch(record, progress.history, progress.global_step)
        self.reporter.end_epoch({**record, "remaining_seconds": remaining.end_epoch()})
        distributed.barrier()
        if stop:
            self.reporter.message(
                f"Early stopping: {stopping.monitor} has not improved for {stopping.patience} epochs "
                f"(best {progress.best_metric:.4f})."
            )
        return stop

    def _save(self, name: str, partials: list[Any] | None = None) -> None:
        """`partials`: every rank's part of a stopped epoch, where several processes train."""
        with (
            stop_signals_deferred()
        ):  # building the state too: Ctrl-C inside pydantic's serialiser is no KeyboardInterrupt
            state = run_state.checkpoint_state(self.parts, self.progress, self.settings, self.spec, self.run_name)
            if partials is not None:
                state["partial_epoch"] = partials
            state["request"] = self.request.to_plain()
            if self.temperature is not None:
                state["temperature"] = self.temperature
            if self.teacher is not None:
                state["distilled_from"] = self.teacher.record()
            run_state.save_state(state, self.checkpoint_dir / name)
            if name == LAST_CHECKPOINT:
                self.saved_epoch, self.saved_partial = self.progress.epoch, self.progress.partial

    # ------------------------------------------------------------------------------------------ the end
    def _finish(self, logger: RunLogger | None) -> dict[str, Any]:
        """Final evaluation of the last weights, with this command's wall clock, logged to TensorBoard."""
        started = synchronised_clock(self.device)
        held_out = self.loaders.evaluation if self._calibrates() else None
        final, report, self.temperature = final_evaluation(
            self.parts.evaluated_model,
            self.loaders.test,
            self.settings,
            self.precision,
            self.device,
            self.progress.history,
            held_out,
        )
        if self.temperature is not None and self.context.is_main:  # last.pth again, now with its temperature
            self._save(LAST_CHECKPOINT)
        # Wall clock of the command so far (set-up to final evaluation) and the plan's estimate: a budget bounds it.
        final.update(wall_seconds=self._elapsed(), planned_seconds=self.run_plan.total_seconds, made_by=provenance())
        # The span the CIFAR-10 speed record times (airbench94: model init with whitening, the training steps, the
        # final TTA evaluation; no per-epoch evaluation), for `cifar bench --vs-record`. Seconds.
        final_eval_seconds = synchronised_clock(self.device) - started
        final.update(
            init_seconds=self.init_seconds,
            final_eval_seconds=final_eval_seconds,
            record_span_seconds=self.init_seconds + final["train_seconds"] + final_eval_seconds,
        )
        if self.progress.history:
            self.reporter.message(describe_final(final, report, self.checkpoint_dir, self.run_dir, self.temperature))
        if logger is not None:
            names = list(self.spec.class_names)
            figure = self.confusion_figure(report.confusion_matrix, names) if self.confusion_figure else None
            logger.log_final(hparams(self.settings), final, figure)
        return final


def train(
    settings: Settings, reporter: Reporter | None = None, confusion_figure: FigureMaker | None = None
) -> TrainResult:
    """Train with `settings`; the one entry point that the CLI and Python users call. `confusion_figure(matrix,
    class names)` makes the figure logged to TensorBoard at the end (the CLI passes a matplotlib one)."""
    return Trainer(settings, reporter, confusion_figure=confusion_figure).run()


def plan_run(settings: Settings, reporter: Reporter | None = None) -> RunPlan:
    """What `train(settings)` would do and how long it would take here, measured but without training."""
    return Trainer(settings, reporter).dry_run()

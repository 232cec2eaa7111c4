"""The training loop: data on the device, mixed precision, checkpoints every epoch, exact resume, early stopping."""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar_cli.data import adopt_prepared, ensure_prepared
from cifar_cli.data.loader import (
    Augment,
    BatchLoader,
    normalize,
    stratified_split,
    training_steps_per_epoch,
)
from cifar_cli.data.prepare import load_cache, read_manifest, read_spec
from cifar_cli.data.spec import DataSpec
from cifar_cli.engine import distributed
from cifar_cli.engine.calibrate import Calibration, calibrate
from cifar_cli.engine.checkpoint import (
    FORMAT_VERSION,
    capture_rng_states,
    load_checkpoint,
    restore_rng_states,
    save_checkpoint,
)
from cifar_cli.engine.device import Precision, describe, resolve_device, resolve_precision
from cifar_cli.engine.distributed import DistContext
from cifar_cli.engine.evaluate import (
    Predictions,
    checkpoint_spec,
    predict,
    report_from_predictions,
    tta_level,
)
from cifar_cli.engine.lookahead import Lookahead
from cifar_cli.engine.memory import keep_freed_memory
from cifar_cli.engine.metrics import epoch_metrics
from cifar_cli.engine.optim import (
    Scheduler,
    build_optimizer,
    build_scheduler,
    restore_scheduler,
    scheduler_steps_per_batch,
)
from cifar_cli.engine.plan import RemainingTime, RunPlan, fit_budget
from cifar_cli.engine.step import forward_backward
from cifar_cli.errors import CifarError, UsageError
from cifar_cli.files import ensure_writable_folder, require_free_space, run_lock, write_text_atomically
from cifar_cli.models import build_model, fixed_image_size
from cifar_cli.settings import OFFICIAL_ARCHIVES, Settings, dump_yaml, resolve_val_size
from cifar_cli.tracking import NullReporter, Reporter, RunLogger

LAST_CHECKPOINT = "last.pth"
FigureMaker = Callable[[list[list[int]], list[str]], Any]  # (confusion matrix, class names) -> a figure
BEST_CHECKPOINT = "best.pth"
WHITENING_SAMPLE = 5000  # training images used to estimate the whitening filters
PROGRESS_UPDATES_PER_EPOCH = 50  # batch-bar refreshes; each one waits for the device
PLAN_FILE = "plan.json"
CIFAR10_SIZES = (50_000, 10_000)  # train, test images: a dry run's counts when nothing is prepared yet


class TrainingInterrupted(CifarError):
    exit_code = 130


@dataclass
class TrainResult:
    run_name: str
    run_dir: Path
    checkpoint_dir: Path
    history: list[dict[str, Any]]
    final_metrics: dict[str, float] = field(default_factory=dict)
    resumed_from_epoch: int = 0
    stopped_early: bool = False
    plan: RunPlan | None = None


# Train settings that do not change what a run learns (where and how fast it runs, how it is shown or evaluated at
# the end), and its length: a run is identified by every other setting, so `--epochs 12` after an 8-epoch run
# extends it, and changing anything else (lookahead, micro-batches, the validation split...) starts another run.
NOT_RECIPE = {
    "epochs", "eval_batch_size", "device", "channels_last", "compile", "deterministic", "tta", "run_name",
    "resume", "num_threads", "keep_freed_memory",
}  # fmt: skip


def recipe_identity(plain: dict[str, Any]) -> dict[str, Any]:
    """The settings that identify a run, as dotted keys, from `Settings.to_plain()` (or a checkpoint's copy)."""
    sections = {name: plain.get(name, {}) for name in ("model", "optim", "scheduler")}
    sections["train"] = {k: v for k, v in plain.get("train", {}).items() if k not in NOT_RECIPE}
    sections["data"] = data_identity(plain.get("data", {}))
    flat: dict[str, Any] = {}
    _flatten(sections, "", flat)
    return flat


def data_identity(data: dict[str, Any]) -> dict[str, Any]:
    """Which images and how many are held out, not where they live: the archive's or the folder's checksum, plus
    the data set and label set beyond CIFAR-10 (so CIFAR-10 runs keep their names)."""
    dataset = data.get("dataset") or "cifar10"
    official_md5 = OFFICIAL_ARCHIVES.get(dataset, ("", ""))[1]
    identity: dict[str, Any] = {
        "md5": (data.get("md5") or official_md5).lower(),
        "val_size": data.get("val_size"),
    }
    if dataset == "cifar100":
        identity.update(dataset=dataset, label_set=data.get("label_set", "fine"))
    if dataset == "folder":  # md5: the folder's content checksum (`adopt_prepared`)
        identity.update(dataset=dataset, image_size=data.get("image_size", 32))
    return identity


def _flatten(value: Any, prefix: str, into: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}{key}.", into)
    else:
        into[prefix.rstrip(".")] = value


def default_run_name(settings: Settings) -> str:
    """Same recipe, same name: running the same command again resumes instead of starting a second run."""
    identity = recipe_identity(settings.to_plain())
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"{settings.preset}-{settings.model.name}-{digest}"


def recipe_differences(stored: dict[str, Any], current: Settings) -> list[tuple[str, Any, Any]]:
    """(setting, in the run, asked for now) where a resume would mix two recipes. `auto` asks for nothing
    specific (the run stored what it resolved to); keys an older checkpoint lacks are not held against it; a
    time budget chose the width."""
    before, now = recipe_identity(stored), recipe_identity(current.to_plain())
    chosen_by_plan = {"model.width_multiplier"} if current.train.time_budget else set()
    return [
        (key, before[key], value)
        for key, value in sorted(now.items())
        if key in before and before[key] != value and value != "auto" and key not in chosen_by_plan
    ]


def expected_checkpoint_bytes(model: torch.nn.Module, optimizer_name: str, lookahead: object | None) -> int:
    """Size of a checkpoint once the optimiser has state: the model's tensors, one or two buffers per parameter
    (momentum; Adam's two moments), the lookahead average, and 1 MB for history, settings and RNG states."""
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers_per_parameter = 2 if optimizer_name in ("adam", "adamw") else 1
    average_bytes = state_bytes if lookahead is not None else 0
    return state_bytes + buffers_per_parameter * parameter_bytes + average_bytes + 1_000_000


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


class Trainer:
    """One training run. `run()` does everything; the pieces are methods so each stays short."""

    def __init__(
        self,
        settings: Settings,
        reporter: Reporter | None = None,
        context: DistContext | None = None,
        confusion_figure: FigureMaker | None = None,
    ):
        self.started = time.perf_counter()  # a time budget counts from here
        self.settings = settings.model_copy(deep=True)  # the plan fills in precision, layout, epochs, width
        self.settings.data = adopt_prepared(
            self.settings.data
        )  # which data is prepared is part of the recipe
        self.context = context or distributed.context_from_env()
        self.reporter = reporter if reporter is not None and self.context.is_main else NullReporter()
        self.confusion_figure = (
            confusion_figure  # the CLI passes plots' figure; the core draws nothing itself
        )
        self.run_name = settings.train.run_name or default_run_name(self.settings)
        self.run_dir = settings.log.log_dir / self.run_name
        self.checkpoint_dir = settings.log.checkpoint_dir / self.run_name
        self.history: list[dict[str, Any]] = []
        self.epoch = 0  # finished epochs
        self.global_step = 0
        self.best_metric: float | None = None
        self.epochs_without_improvement = 0
        self._last_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------ set-up
    def _setup_device(self) -> None:
        train = self.settings.train
        device = resolve_device(train.device)
        if self.context.enabled and device.type == "cuda":
            device = torch.device("cuda", self.context.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if train.num_threads:
            torch.set_num_threads(train.num_threads)
        if train.keep_freed_memory:
            keep_freed_memory(device.type)

    def _load_data(self) -> None:
        """Training images, the validation split held out of them (when the recipe has one) and the test split.

        Each epoch is evaluated on the validation split, or, without one, on the test split for the curves only:
        then nothing (best.pth, early stopping, the plateau scheduler) reads it; `check_recipe` refuses otherwise.
        """
        ensure_prepared(self.settings.data, self.reporter.message)
        self.spec = self._data_spec()
        cache = load_cache(self.settings.data.processed_dir)
        images, labels = cache["train_images"], cache["train_labels"]
        val_size = self._resolve_val_size(len(labels))
        self.test_split = (cache["test_images"], cache["test_labels"])
        if val_size:
            if val_size >= len(labels):
                raise UsageError(
                    f"data.val_size={val_size} leaves no training images (the split has {len(labels)})."
                )
            train_index, val_index = stratified_split(labels, val_size, self.settings.train.seed)
            self.split = (images[train_index], labels[train_index], images[val_index], labels[val_index])
        else:
            self.split = (images, labels, *self.test_split)
        self.eval_split = "val" if val_size else "test"

    def _data_spec(self) -> DataSpec:
        """The prepared data's classes, size and statistics; a model made for one input size refuses others. A
        resumed run keeps the statistics its weights were trained with (older checkpoints: CIFAR-10's constants)."""
        spec = read_spec(self.settings.data.processed_dir)
        if self._should_resume():
            trained = checkpoint_spec(self._last_checkpoint())
            spec = replace(spec, mean=trained.mean, std=trained.std)
        name, fixed = self.settings.model.name, fixed_image_size(self.settings.model.name)
        if fixed is not None and spec.image_size != fixed:
            raise UsageError(
                f"Model {name} takes {fixed} x {fixed} images; the data in {self.settings.data.processed_dir} is "
                f"{spec.image_size} x {spec.image_size}.",
                hint=f"Choose a model that pools globally (airbench, resnet18), or prepare the data with "
                f"--image-size {fixed}.",
            )
        return spec

    def _resolve_val_size(self, train_images: int) -> int:
        """auto -> a number, stored in the run's settings (a resumed run keeps its checkpoint's split)."""
        stored = self._stored_settings()
        val_size = (
            stored["data"]["val_size"]
            if stored is not None
            else resolve_val_size(self.settings, train_images)
        )
        self.settings.data.val_size = val_size
        return val_size

    # ------------------------------------------------------------------------------------------ plan
    def plan(self, train_images: int, val_images: int, test_images: int) -> RunPlan:
        """Precision, memory layout, epochs and width of this run, from speeds measured on this machine (on rank 0,
        shared with the others); a resumed run keeps what its checkpoint chose."""
        plan = self._measure_plan(train_images, val_images, test_images) if self.context.is_main else None
        plan = distributed.broadcast_from_main(plan)
        train, model = self.settings.train, self.settings.model
        train.precision, train.channels_last = plan.calibration.precision, plan.calibration.channels_last
        train.epochs, model.width_multiplier = plan.epochs, plan.width_multiplier
        self.precision: Precision = resolve_precision(train.precision, self.device)
        self.reporter.message(plan.describe())
        return plan

    def _measure_plan(self, train_images: int, val_images: int, test_images: int) -> RunPlan:
        settings, train = self.settings, self.settings.train
        stored = self._stored_settings()
        precision, channels_last = train.precision, train.channels_last
        if stored is not None:  # the same numerics as the epochs before
            precision = stored["train"]["precision"] if precision == "auto" else precision
            channels_last = stored["train"]["channels_last"] if channels_last == "auto" else channels_last

        def calibrate_at(width: float) -> Calibration:
            model = settings.model.model_copy(update={"width_multiplier": width})
            result = calibrate(model, settings.optim, train.batch_size, self.device, precision, channels_last)
            self.reporter.message(
                result.summary(train.precision) + (f" at width x{width:g}" if width != 1 else "")
            )
            return result

        steps = training_steps_per_epoch(train_images, train.batch_size, self.context.world_size)
        level, budget = tta_level(train), train.time_budget
        if budget is not None and stored is None:
            width = settings.model.width_multiplier
            return fit_budget(
                budget,
                self._elapsed,
                calibrate_at,
                width,
                steps,
                train.batch_size,
                val_images,
                level,
                test_images,
            )
        epochs, width = train.epochs, settings.model.width_multiplier
        if stored is not None and budget is not None:  # a resumed budget run keeps the plan it started with
            epochs, width = stored["train"]["epochs"], stored["model"]["width_multiplier"]
        calibration = calibrate_at(width)
        return RunPlan(
            epochs, width, train.batch_size, steps, val_images, level, calibration, budget, self._elapsed(),
            test_images,
        )  # fmt: skip

    def _elapsed(self) -> float:
        """Seconds since this run started (a time budget counts from there)."""
        return time.perf_counter() - self.started

    def _stored_settings(self) -> dict[str, Any] | None:
        """The settings saved in the run's last.pth, when this run will resume from it."""
        return self._last_checkpoint()["settings"] if self._should_resume() else None

    def _last_checkpoint(self) -> dict[str, Any]:
        """last.pth of this run, read once (the plan needs its settings, the resume everything)."""
        if self._last_state is None:
            self._last_state = load_checkpoint(
                self.checkpoint_dir / LAST_CHECKPOINT, map_location=self.device
            )
        return self._last_state

    def dry_run(self) -> RunPlan:
        """The plan, without training or touching the data (counts from the manifest, else CIFAR-10's)."""
        self._setup_device()
        manifest = read_manifest(self.settings.data.processed_dir) or {}
        counts = manifest.get("counts", {})
        train_images = counts.get("train", CIFAR10_SIZES[0])
        test_images = counts.get("test", CIFAR10_SIZES[1])
        val_size = resolve_val_size(self.settings, train_images)
        return self.plan(train_images - val_size, val_size or test_images, test_images)

    def _setup_loaders(self) -> None:
        images, labels, val_images, val_labels = self.split
        self.train_images = images.to(self.device)
        train = self.settings.train
        # Autocast would cast the inputs anyway; producing them in its dtype saves a conversion pass per batch.
        input_dtype = self.precision.autocast_dtype or torch.float32
        self.train_loader = BatchLoader(
            self.train_images,
            labels.to(self.device),
            train.batch_size,
            train=True,
            spec=self.spec,
            augment=Augment(**train.augment.model_dump()),
            seed=train.seed,
            dtype=input_dtype,
            channels_last=train.channels_last,
            rank=self.context.rank,
            world_size=self.context.world_size,
        )

        def evaluation_loader(images: torch.Tensor, labels: torch.Tensor) -> BatchLoader:
            return BatchLoader(
                images.to(self.device),
                labels.to(self.device),
                train.eval_batch_size,
                train=False,
                spec=self.spec,
                dtype=input_dtype,
                channels_last=train.channels_last,
            )

        self.val_loader = evaluation_loader(val_images, val_labels)  # each epoch's evaluation
        self.test_loader = (
            self.val_loader if self.eval_split == "test" else evaluation_loader(*self.test_split)
        )
        if len(self.train_loader) == 0:
            raise UsageError("No training batches: the training split is smaller than one batch per process.")

    def _setup_model(self) -> None:
        settings = self.settings
        model = build_model(settings.model.name, settings.model.width_multiplier, self.spec.num_classes)
        init_from_data = getattr(model, "init_from_data", None)
        if init_from_data is not None:
            sample = self.train_images[: min(WHITENING_SAMPLE, len(self.train_images))].cpu()
            init_from_data(normalize(sample, torch.float32, False, self.spec))  # fp32, outside autocast
        memory_format = torch.channels_last if settings.train.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=memory_format)
        # Muon's matrix products in the step's precision: bf16 only where it was chosen for being fast here.
        muon_dtype = self.precision.autocast_dtype or torch.float32
        self.optimizer = build_optimizer(self.model, settings.optim, muon_dtype)
        self.scheduler: Scheduler | None = build_scheduler(
            self.optimizer,
            settings.scheduler,
            settings.train.epochs,
            len(self.train_loader),
            settings.train.early_stopping.mode,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.use_grad_scaler)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=settings.optim.label_smoothing)
        self.total_steps = settings.train.epochs * len(self.train_loader)
        self.lookahead = Lookahead(self.model) if settings.train.lookahead else None
        self.train_model: nn.Module = self.model
        if self.context.enabled:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # A frozen whitening bias (airbench, after a few epochs) stops receiving gradients mid-run.
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=device_ids,
                find_unused_parameters=hasattr(self.model, "whiten_bias_trainable"),
            )
        if settings.train.compile:
            self.train_model = torch.compile(self.train_model)

    # ------------------------------------------------------------------------------------------ resume
    def _should_resume(self) -> bool:
        wanted = self.settings.train.resume
        exists = (self.checkpoint_dir / LAST_CHECKPOINT).is_file()
        if wanted and not exists:
            raise UsageError(
                f"--resume was given but {self.checkpoint_dir / LAST_CHECKPOINT} does not exist.",
                hint="Check --run-name and --checkpoint-dir, or drop --resume.",
            )
        return exists and wanted is not False

    def _check_same_recipe(self) -> None:
        """A resume continues the same recipe; another optimiser or model would fail deep inside torch."""
        differences = recipe_differences(self._last_checkpoint()["settings"], self.settings)
        if differences:
            shown = "\n".join(
                f"  {key}: {before!r} in the run, {now!r} now" for key, before, now in differences[:8]
            )
            more = f"\n  ... and {len(differences) - 8} more" if len(differences) > 8 else ""
            raise UsageError(
                f"Run {self.run_name!r} was trained with other settings; resuming it would mix two recipes:\n"
                f"{shown}{more}",
                hint="Start a new run with another --run-name (or drop --run-name to get one per recipe), "
                "or --no-resume to train this one again from scratch.",
            )

    def _resume(self) -> None:
        state = self._last_checkpoint()
        self.model.load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        if self.scheduler is not None and state.get("scheduler_state"):
            restore_scheduler(self.scheduler, state["scheduler_state"])
        if state.get("scaler_state"):
            self.scaler.load_state_dict(state["scaler_state"])
        if self.lookahead is not None and state.get("lookahead_state"):
            self.lookahead.load_state_dict(state["lookahead_state"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.history = list(state["history"])[: self.epoch]
        self.best_metric = state.get("best_metric")
        self.epochs_without_improvement = state.get("epochs_without_improvement", 0)
        restore_rng_states(state["rng"])
        self.reporter.message(f"Resuming run {self.run_name} after epoch {self.epoch} ({LAST_CHECKPOINT}).")

    def _check_checkpoint_space(self) -> None:
        """Refuse before the first epoch when the checkpoints cannot fit: their size is known from the model."""
        files = [LAST_CHECKPOINT] + ([BEST_CHECKPOINT] if self.eval_split == "val" else [])
        missing = sum(not (self.checkpoint_dir / name).exists() for name in files)
        needed = (missing + 1) * expected_checkpoint_bytes(
            self.model, self.settings.optim.name, self.lookahead
        )
        require_free_space(
            self.checkpoint_dir,
            needed,
            f"checkpoints ({', '.join(files)} and one being written)",
            hint="Free disk space or choose another --checkpoint-dir.",
        )

    # ------------------------------------------------------------------------------------------ loop
    def run(self) -> TrainResult:
        settings = self.settings
        if self.context.is_main:
            # Fail now, not after the first epoch, when a folder cannot be written or the disk is full.
            ensure_writable_folder(self.checkpoint_dir, probe=True)
            ensure_writable_folder(self.run_dir, probe=True)
        # One process owns a run: a second `cifar train` of the same run is refused with the owner's PID.
        owned = [self.checkpoint_dir, self.run_dir] if self.context.is_main else []
        with run_lock(owned, self.run_name):
            seed_everything(settings.train.seed, settings.train.deterministic)
            self._setup_device()
            try:
                distributed.init_process_group(self.context, self.device)
                return self._run()
            finally:
                distributed.destroy_process_group()

    def _run(self) -> TrainResult:
        if self._should_resume():
            self._check_same_recipe()
        self._load_data()
        self.run_plan = self.plan(len(self.split[1]), len(self.split[3]), len(self.test_split[1]))
        self._setup_loaders()
        self._setup_model()
        resumed_from = 0
        if self._should_resume():
            self._resume()
            resumed_from = self.epoch
        if self.context.is_main:
            self._check_checkpoint_space()
        self.remaining = RemainingTime(self.run_plan, self.epoch)
        if resumed_from >= self.settings.train.epochs:
            self.reporter.message(
                f"Run {self.run_name} has already finished {resumed_from} epochs: nothing to train. "
                "Use --no-resume to train it again, or raise --epochs to extend it."
            )
            # Nothing is written: no logger, so no stray TensorBoard events file and no open writer.
            return TrainResult(
                self.run_name,
                self.run_dir,
                self.checkpoint_dir,
                self.history,
                {},
                resumed_from,
                plan=self.run_plan,
            )
        logger = (
            RunLogger(self.run_dir, dump_yaml(self.settings), self.settings.log.tensorboard)
            if self.context.is_main
            else None
        )
        if self.context.is_main:
            write_text_atomically(self.run_dir / PLAN_FILE, json.dumps(self.run_plan.to_json(), indent=2))
        self.reporter.message(self._banner())
        stopped_early = False
        try:
            while self.epoch < self.settings.train.epochs and not stopped_early:
                record = self._train_and_validate_epoch()
                stopped_early = self._after_epoch(record, logger)
            final_metrics = self._finish(logger)
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                f"Interrupted. {LAST_CHECKPOINT} holds epoch {self.epoch} of run {self.run_name}.",
                hint=f"Resume with: cifar train --run-name {self.run_name} (plus the same options as before).",
            ) from None
        finally:
            self.reporter.close()
            if logger is not None:
                logger.close()
        return TrainResult(
            self.run_name,
            self.run_dir,
            self.checkpoint_dir,
            self.history,
            final_metrics,
            resumed_from,
            stopped_early,
            self.run_plan,
        )

    def _banner(self) -> str:
        train = self.settings.train
        parts = [
            f"run {self.run_name}",
            f"model {self.settings.model.name}",
            f"device {describe(self.device)}",
            f"precision {self.precision.name}",
            f"{len(self.train_loader.labels):,} training images, {len(self.val_loader.labels):,} for validation",
            f"batch {train.batch_size} x {len(self.train_loader)} steps x {train.epochs} epochs",
        ]
        if self.context.enabled:
            parts.append(f"{self.context.world_size} processes")
        return "Training: " + ", ".join(parts)

    def _train_and_validate_epoch(self) -> dict[str, Any]:
        epoch = self.epoch + 1
        self.reporter.start_epoch(epoch, self.settings.train.epochs, len(self.train_loader))
        self.remaining.start_epoch()
        started = time.perf_counter()
        train_stats = self._train_one_epoch()
        seconds = time.perf_counter() - started
        evaluated = predict(self.model, self.val_loader, self.precision, self.device, tta_level=0)
        report = report_from_predictions(evaluated, list(self.spec.class_names))
        images_seen = len(self.train_loader) * self.settings.train.batch_size * self.context.world_size
        split = self.eval_split  # "val", or "test" where the recipe holds out nothing (curves only)
        return {
            "epoch": epoch,
            **{f"train_{key}": value for key, value in train_stats.items()},
            f"{split}_loss": evaluated.loss,
            f"{split}_accuracy": report.accuracy,
            f"{split}_precision": report.precision_macro,
            f"{split}_recall": report.recall_macro,
            f"{split}_f1": report.f1_macro,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "images_per_second": images_seen / seconds,
            "step": self.global_step,
        }

    def _train_one_epoch(self) -> dict[str, float]:
        model, loader = self.train_model, self.train_loader
        loader.set_epoch(self.epoch)
        if hasattr(self.model, "whiten_bias_trainable"):
            self.model.whiten_bias_trainable = self.epoch < self.settings.model.whiten_bias_epochs
        model.train()
        metrics = epoch_metrics(self.spec.num_classes, self.device)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        steps_per_batch = scheduler_steps_per_batch(self.scheduler)
        refresh_every = max(1, len(loader) // PROGRESS_UPDATES_PER_EPOCH)
        started = time.perf_counter()
        for batch_index, (images, targets) in enumerate(loader, start=1):
            loss, logits = self._step(model, images, targets)
            if steps_per_batch:
                self.scheduler.step()
            self.global_step += 1
            if self.lookahead is not None:
                self.lookahead.maybe_sync(self.model, self.global_step, self.total_steps)
            loss_sum += loss
            predicted = logits.argmax(dim=1)
            metrics.update(predicted, targets)
            correct += (predicted == targets).sum()
            if batch_index % refresh_every == 0 or batch_index == len(loader):
                self._check_finite(loss_sum, batch_index)
                self._report_batch(batch_index, loss_sum, correct, started)
        totals = distributed.all_reduce_sum(
            torch.stack([loss_sum, torch.tensor(float(len(loader)), device=self.device)])
        )
        computed = {key: float(value) for key, value in metrics.compute().items()}
        if self.lookahead is not None and self.epoch + 1 == self.settings.train.epochs:
            self.lookahead.finish(self.model)  # the last epoch ends on the averaged weights
        return {"loss": float(totals[0] / totals[1]), **computed}

    def _step(
        self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on the batch; returns its mean loss and the logits, detached."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = forward_backward(
            model,
            images,
            targets,
            self.criterion,
            self.precision,
            self.scaler,
            self.settings.train.micro_batch_size,
        )
        if self.settings.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, logits

    def _check_finite(self, loss_sum: torch.Tensor, batch_index: int) -> None:
        if not math.isfinite(float(loss_sum)):
            raise CifarError(
                f"The loss became {float(loss_sum)} in epoch {self.epoch + 1} by batch {batch_index}; training stopped.",
                hint="Lower the learning rate (--lr), enable --set optim.grad_clip=1.0, or use --precision fp32.",
            )

    def _report_batch(self, done: int, loss_sum: torch.Tensor, correct: torch.Tensor, started: float) -> None:
        """Live numbers of this process's batches so far (the epoch record holds the all-rank values)."""
        elapsed = max(time.perf_counter() - started, 1e-9)
        self.reporter.update_batch(
            done,
            {
                "loss": float(loss_sum) / done,
                "accuracy": float(correct) / (done * self.settings.train.batch_size),
                "lr": self.optimizer.param_groups[0]["lr"],
                "images_per_second": done
                * self.settings.train.batch_size
                * self.context.world_size
                / elapsed,
                "remaining_seconds": self.remaining.during_epoch(done),
            },
        )

    def _after_epoch(self, record: dict[str, Any], logger: RunLogger | None) -> bool:
        """Bookkeeping after an epoch; returns True when early stopping says to stop."""
        self.epoch = record["epoch"]
        self.history.append(record)
        stopping = self.settings.train.early_stopping
        # A monitor on the test split is never read: without a validation split there is no val_* to monitor.
        # Rank 0's value decides for every rank (best.pth, the plateau scheduler's lr, early stopping), so the
        # processes of a DDP run can never disagree about when to stop.
        monitored = distributed.broadcast_from_main(record.get(stopping.monitor))
        improved = monitored is not None and (
            self.best_metric is None
            or (monitored > self.best_metric if stopping.mode == "max" else monitored < self.best_metric)
        )
        if improved:
            self.best_metric, self.epochs_without_improvement = monitored, 0
        elif monitored is not None:
            self.epochs_without_improvement += 1
        if self.scheduler is not None and not scheduler_steps_per_batch(self.scheduler):
            self.scheduler.step(monitored)
        if self.context.is_main:
            self._save(self.checkpoint_dir / LAST_CHECKPOINT)
            if (
                improved and self.eval_split == "val"
            ):  # best.pth exists only where a validation split chose it
                self._save(self.checkpoint_dir / BEST_CHECKPOINT)
            logger.log_epoch(record, self.history, self.global_step)
        self.reporter.end_epoch({**record, "remaining_seconds": self.remaining.end_epoch()})
        distributed.barrier()
        stop = bool(stopping.patience) and self.epochs_without_improvement >= stopping.patience
        if stop:
            self.reporter.message(
                f"Early stopping: {stopping.monitor} has not improved for {stopping.patience} epochs "
                f"(best {self.best_metric:.4f})."
            )
        return stop

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model_name": self.settings.model.name,
            "model_state": self.model.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler_state": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "lookahead_state": self.lookahead.state_dict() if self.lookahead is not None else None,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "history": self.history,
            "best_metric": self.best_metric,
            "epochs_without_improvement": self.epochs_without_improvement,
            "rng": capture_rng_states(),
            "settings": self.settings.to_plain(),
            "class_names": list(self.spec.class_names),
            "data_spec": self.spec.to_dict(),
            "run_name": self.run_name,
        }

    def _save(self, path: Path) -> None:
        save_checkpoint(
            self.checkpoint_state(),
            path,
            hint=f"The previous {path.name} is intact. Free disk space or choose another --checkpoint-dir, "
            "then run the same command to resume.",
        )

    def _finish(self, logger: RunLogger | None) -> dict[str, float]:
        """Final evaluation (with TTA when enabled) of the last weights, logged to TensorBoard."""
        level = tta_level(self.settings.train)
        predictions: Predictions = predict(self.model, self.test_loader, self.precision, self.device, level)
        report = report_from_predictions(predictions, list(self.spec.class_names))
        last_val = {"val_accuracy": self.history[-1]["val_accuracy"]} if self.eval_split == "val" else {}
        final = {
            # The last weights on the test split, read once, after training: never used to choose anything.
            "split": "test",
            "accuracy": report.accuracy,
            "f1": report.f1_macro,
            "loss": predictions.loss,
            **last_val,
            "tta_level": level,
            "epochs": self.epoch,
            "train_seconds": sum(record["seconds"] for record in self.history),
            # Wall clock of this command's run so far (set-up, measurement, epochs, final evaluation) and the plan's
            # estimate of it: a time budget bounds the first.
            "wall_seconds": self._elapsed(),
            "planned_seconds": self.run_plan.total_seconds,
        }
        if self.history:
            self.reporter.message(
                f"Final {'TTA ' if level else ''}test accuracy {report.accuracy:.2%} (macro F1 {report.f1_macro:.3f}); "
                f"checkpoints in {self.checkpoint_dir}, logs in {self.run_dir}"
            )
        if logger is not None:
            figure = (
                self.confusion_figure(report.confusion_matrix, list(self.spec.class_names))
                if self.confusion_figure
                else None
            )
            logger.log_final(_hparams(self.settings), final, figure)
        return final


def _hparams(settings: Settings) -> dict[str, Any]:
    """Every setting that identifies the run (a sweep's varied ones included) and its length, for TensorBoard's
    HParams tab; lists and nested values are written as text."""
    identity = recipe_identity(settings.to_plain())
    values = {
        key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
        for key, value in identity.items()
    }
    return {**{k: v for k, v in values.items() if v is not None}, "train.epochs": settings.train.epochs}


def train(
    settings: Settings, reporter: Reporter | None = None, confusion_figure: FigureMaker | None = None
) -> TrainResult:
    """Train with `settings`; the one entry point that the CLI and Python users call. `confusion_figure(matrix,
    class names)` makes the figure logged to TensorBoard at the end (the CLI passes a matplotlib one)."""
    return Trainer(settings, reporter, confusion_figure=confusion_figure).run()


def plan_run(settings: Settings, reporter: Reporter | None = None) -> RunPlan:
    """What `train(settings)` would do and how long it would take here, measured but without training."""
    return Trainer(settings, reporter).dry_run()

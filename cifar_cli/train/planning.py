"""How a training run plans itself: the preset's rung, precision, memory layout, epochs and width from speeds
measured on this machine (budget/plan.py), and a dry run that stops there. `Trainer` (train/run.py) inherits it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from cifar_cli.budget.ladder import adopt_rung, choose_rung, full_schedule
from cifar_cli.budget.measure import measure_plan
from cifar_cli.budget.plan import TTA_VIEWS, RunPlan, final_views
from cifar_cli.config.settings import Settings, fits_temperature, resolve_val_size
from cifar_cli.data.prepare import read_manifest
from cifar_cli.data.spec import DataSpec
from cifar_cli.recipe.distill import Teacher, ready_teacher
from cifar_cli.runtime import distributed
from cifar_cli.runtime.device import Precision, resolve_precision
from cifar_cli.runtime.distributed import DistContext
from cifar_cli.train import state as run_state
from cifar_cli.train.finetune import Source
from cifar_cli.train.identity import apply_plan
from cifar_cli.train.setup import check_small_images, data_spec, setup_device
from cifar_cli.train.tracking import Reporter

CIFAR10_SIZES = (50_000, 10_000)  # train, test images: a dry run's counts when nothing is prepared yet


class RunPlanning:
    """The planning half of a `Trainer` (rung, precision, layout, epochs, width), on the attributes `Trainer` sets."""

    settings: Settings
    context: DistContext
    reporter: Reporter
    device: torch.device
    last: run_state.ResumePoint
    source: Source | None = None  # a fine-tuning run's starting weights; a dry run reads none
    spec: DataSpec
    epoch_split: str
    teacher: Teacher | None
    teacher_cost: float  # seconds per image that distillation adds to every step
    clock: Callable[[], float]
    started: float
    precision: Precision

    def plan(self, train_images: int, val_images: int, test_images: int) -> RunPlan:
        """Precision, memory layout, epochs and width of this run, from speeds measured on this machine (on rank 0,
        shared with the others); a resumed run keeps what its checkpoint chose."""
        chosen = self._measure_plan(train_images, val_images, test_images) if self.context.is_main else None
        rung, plan = distributed.broadcast_from_main(chosen)
        if rung != self.settings.preset:  # the other ranks follow rank 0's rung of the ladder
            self._adopt_rung(rung)
        apply_plan(self.settings, plan)
        self.precision: Precision = resolve_precision(self.settings.train.precision, self.device)
        self.reporter.message(plan.describe())
        return plan

    def _measure_plan(self, train_images: int, val_images: int, test_images: int) -> tuple[str, RunPlan]:
        """(the preset trained, its plan): a budget run free to climb the ladder first chooses its rung."""
        final_images = test_images + self._calibration_images(val_images, test_images)
        images, stored = (train_images, val_images, final_images), self.last.settings

        def measure(settings: Settings) -> RunPlan:
            return measure_plan(
                settings,
                stored,
                self.device,
                self.context.world_size,
                self.reporter.message,
                self._elapsed,
                images,
                self.teacher_cost,
            )

        if not self.settings.rungs or stored is not None or self.settings.train.time_budget is None:
            return self.settings.preset, measure(self.settings)
        choice = choose_rung(
            self.settings.rungs, self.settings.train.time_budget, full_schedule(measure, self.device.type)
        )
        self.reporter.message(choice.describe())
        self._adopt_rung(choice.preset)
        return choice.preset, replace(measure(self.settings), ladder=choice.to_json())

    def _ready_teacher(self, train_images: torch.Tensor, dry_run: bool = False) -> tuple[Teacher | None, float]:
        """The teacher of a distilling run, checked against the data before any training, and the seconds per
        image the planner adds to every step (none where it scored every image at once); (None, 0) without one."""
        train = self.settings.train
        if train.distill.teacher is None:
            return None, 0.0
        epochs = train.epochs if dry_run else None  # a dry run scores nothing: the fast path's cost spread out
        small = train.low_res.applies(self.device.type, train.time_budget is not None)
        return ready_teacher(train.distill.teacher, self.device, self.spec, train_images, train.augment, epochs, small)

    def _adopt_rung(self, preset: str) -> None:
        """Train the ladder's rung `preset`, with this run's data, folders and starting weights."""
        self.settings = adopt_rung(self.settings, preset)
        if hasattr(self, "spec"):  # the data is loaded: the statistics a model made for one input size needs
            trained = self.source.spec if self.source is not None else None
            self.spec = data_spec(self.settings.data, self.settings.model.name, trained)

    def _elapsed(self) -> float:
        """Seconds since this run started (a time budget counts from there)."""
        return self.clock() - self.started

    def dry_run(self) -> RunPlan:
        """The plan, without training or touching the data (counts from the manifest, else CIFAR-10's)."""
        self.device = setup_device(self.settings.train, self.context)
        manifest = read_manifest(self.settings.data.processed_dir) or {}
        counts = manifest.get("counts", {})
        train_images = counts.get("train", CIFAR10_SIZES[0])
        test_images = counts.get("test", CIFAR10_SIZES[1])
        val_size = resolve_val_size(self.settings, train_images)
        self.epoch_split = "val" if val_size else "test"
        if manifest and self.settings.train.distill.teacher is not None:  # timed on random images of the data's size
            self.spec = data_spec(self.settings.data, self.settings.model.name)
            noise = torch.randint(0, 256, (64, 3, self.spec.image_size, self.spec.image_size)).byte()
            self.teacher, self.teacher_cost = self._ready_teacher(noise, dry_run=True)
        classes = len(manifest.get("class_names", ())) or 10
        check_small_images(self.settings, self.device.type, classes)
        training = min(train_images - val_size, self.settings.data.train_subset or train_images)
        return self.plan(training, val_size or test_images, test_images)

    def _calibration_images(self, val_images: int, test_images: int) -> int:
        """Where a temperature is fitted at the end (train/report.py), the validation split with every view and,
        after a selective TTA pass, the test split again with every view: as test images of the final stage."""
        if not self._calibrates():
            return 0
        train = self.settings.train
        level, share = train.tta_level(), train.tta_share
        extra_views = (val_images + (test_images if level and share < 1 else 0)) * TTA_VIEWS[level]
        return math.ceil(extra_views / final_views(level, share))

    def _calibrates(self) -> bool:  # train.calibrate, with a validation split to fit the temperature on
        return fits_temperature(self.settings) and self.epoch_split == "val"

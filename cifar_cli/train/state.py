"""A run in progress as its checkpoints hold it: what is saved after each epoch, and how a resume puts it back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cifar_cli.checkpoint import (
    FORMAT_VERSION,
    capture_rng_states,
    load_checkpoint,
    restore_rng_states,
    save_checkpoint,
)
from cifar_cli.config.settings import Settings
from cifar_cli.data.spec import DataSpec
from cifar_cli.errors import UsageError
from cifar_cli.files import require_free_space
from cifar_cli.recipe.optim import restore_scheduler
from cifar_cli.runtime import ranks
from cifar_cli.runtime.distributed import DistContext
from cifar_cli.train.identity import provenance, recipe_differences
from cifar_cli.train.setup import Parts

LAST_CHECKPOINT = "last.pth"  # every epoch: what a resume continues from
# Said when a run resumes from a checkpoint that `cifar calibrate` gave a temperature: the next save has none.
DROPPED_TEMPERATURE = (
    f"{LAST_CHECKPOINT} held a temperature from `cifar calibrate`; it is dropped, as the weights it was fitted to "
    "change from here. Run `cifar calibrate` again once this run ends."
)
BEST_CHECKPOINT = "best.pth"  # the epoch with the best monitored validation value (only with a validation split)


@dataclass
class PartialEpoch:
    """An epoch stopped at a step boundary by a signal (runtime/stopping.py): how many of its batches are done,
    its numbers so far and its loader's random streams, so that a resume goes on batch for batch."""

    epoch: int
    batches: int  # done, of the `steps` the epoch was to have
    steps: int
    loss_sum: float  # this process's summed batch losses
    confusion: list[int]  # this process's true x predicted counts, flattened
    seconds: float  # training time so far
    generator_states: list[torch.Tensor]

    def to_state(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_state(cls, state: dict[str, Any] | list[dict[str, Any]] | None, rank: int = 0) -> PartialEpoch | None:
        """This rank's part: a multi-process run saves one per rank (its own numbers and random streams); a rank
        that was not there before (more processes now) takes rank 0's place in the epoch, without its numbers."""
        if isinstance(state, list):
            if rank < len(state):
                return cls(**state[rank])
            first = cls(**state[0])
            return cls(first.epoch, first.batches, first.steps, 0.0, [0] * len(first.confusion), first.seconds, [])
        return None if state is None else cls(**state)


@dataclass
class Progress:
    """How far a run has come: finished epochs, optimiser steps, their records, the early-stopping count, and
    the epoch a signal stopped part way (None: the run stopped between epochs)."""

    epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    epochs_without_improvement: int = 0
    partial: PartialEpoch | None = None


class ResumePoint:
    """A run's last.pth as a resume reads it: whether the run resumes (rank 0 decides from its own disk, for every
    rank: other nodes may have no checkpoint folder) and the file, read once and sent to every rank (through the
    CPU where there are several)."""

    def __init__(
        self, checkpoint_dir: Path, wanted: bool | None, context: DistContext, device: Callable[[], torch.device]
    ) -> None:
        self.path, self.wanted, self.context, self.device = checkpoint_dir / LAST_CHECKPOINT, wanted, context, device
        self._resuming: bool | None = None
        self._state: dict[str, Any] | None = None

    @property
    def resuming(self) -> bool:
        if self._resuming is None:
            self._resuming = ranks.decided_by_main(self._resume_here)
        return self._resuming

    def _resume_here(self) -> bool:
        exists = self.path.is_file()
        if self.wanted and not exists:
            raise UsageError(
                f"--resume was given but {self.path} does not exist.",
                hint="Check --run-name and --checkpoint-dir, or drop --resume.",
            )
        return exists and self.wanted is not False

    @property
    def state(self) -> dict[str, Any]:
        """The whole checkpoint (the plan needs its settings, the resume everything)."""
        if self._state is None:
            place = "cpu" if self.context.enabled else self.device()
            self._state = ranks.decided_by_main(lambda: load_checkpoint(self.path, map_location=place))
        return self._state

    @property
    def settings(self) -> dict[str, Any] | None:
        """The settings saved in last.pth, when this run will resume from it."""
        return self.state["settings"] if self.resuming else None


def checkpoint_state(
    parts: Parts, progress: Progress, settings: Settings, spec: DataSpec, run_name: str
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "model_name": settings.model.name,
        "model_state": parts.model.state_dict(),
        "optimizer_state": parts.optimizer.state_dict(),
        "scheduler_state": parts.scheduler.state_dict() if parts.scheduler is not None else None,
        "scaler_state": parts.scaler.state_dict() if parts.scaler.is_enabled() else None,
        "lookahead_state": parts.lookahead.state_dict() if parts.lookahead is not None else None,
        # train.ema's averaged weights: what evaluate, predict, export and calibrate load (checkpoint.py)
        "ema_state": parts.ema.state_dict() if parts.ema is not None else None,
        "epoch": progress.epoch,
        "global_step": progress.global_step,
        "history": progress.history,
        "best_metric": progress.best_metric,
        "epochs_without_improvement": progress.epochs_without_improvement,
        # one per rank where several processes train (run.py gathers them): a list of these
        "partial_epoch": progress.partial.to_state() if progress.partial is not None else None,
        "rng": capture_rng_states(),
        "settings": settings.to_plain(),
        "class_names": list(spec.class_names),
        "data_spec": spec.to_dict(),
        "run_name": run_name,
        "started_from": parts.started_from,
        "made_by": provenance(),  # package version, git commit, torch, Python
    }


def save_state(state: dict[str, Any], path: Path) -> None:
    save_checkpoint(
        state,
        path,
        hint=f"The previous {path.name} is intact. Free disk space or choose another --checkpoint-dir, "
        "then run the same command to resume.",
    )


def restore(parts: Parts, state: dict[str, Any], rank: int = 0) -> Progress:
    """Put a checkpoint's weights, optimiser, schedule, scaler, lookahead and random generators back."""
    parts.model.load_state_dict(state["model_state"])
    parts.optimizer.load_state_dict(state["optimizer_state"])
    if parts.scheduler is not None and state.get("scheduler_state"):
        restore_scheduler(parts.scheduler, state["scheduler_state"])
    if state.get("scaler_state"):
        parts.scaler.load_state_dict(state["scaler_state"])
    if parts.lookahead is not None and state.get("lookahead_state"):
        parts.lookahead.load_state_dict(state["lookahead_state"])
    if parts.ema is not None and state.get("ema_state"):
        parts.ema.load_state_dict(state["ema_state"])
    elif parts.ema is not None:  # a checkpoint kept no average: it starts from the restored weights, not random ones
        parts.ema.load_state_dict(parts.model.state_dict())
    restore_rng_states(state["rng"])
    parts.started_from = state.get("started_from")
    epoch = state["epoch"]
    return Progress(
        epoch,
        state["global_step"],
        list(state["history"])[:epoch],
        state.get("best_metric"),
        state.get("epochs_without_improvement", 0),
        PartialEpoch.from_state(state.get("partial_epoch"), rank),
    )


def check_same_recipe(state: dict[str, Any], request: Settings, planned: Settings, run_name: str) -> None:
    """A resume continues the same recipe; another optimiser or model would fail deep inside torch. The user's
    request is compared with the one the checkpoint kept; a checkpoint of an older version kept only the planned
    settings, compared with `planned` (the request on the checkpoint's rung) but for the plan's own choices."""
    if state.get("request") is not None:
        differences = recipe_differences(state["request"], request)
    else:
        differences = recipe_differences(state["settings"], planned, planned=True)
    if not differences:
        return
    shown = "\n".join(f"  {key}: {before!r} in the run, {now!r} now" for key, before, now in differences[:8])
    more = f"\n  ... and {len(differences) - 8} more" if len(differences) > 8 else ""
    raise UsageError(
        f"Run {run_name!r} was trained with other settings; resuming it would mix two recipes:\n{shown}{more}",
        hint="Start a new run with another --run-name (or drop --run-name to get one per recipe), "
        "or --no-resume to train this one again from scratch.",
    )


def expected_checkpoint_bytes(model: torch.nn.Module, optimizer_name: str, averages: int) -> int:
    """Size of a checkpoint once the optimiser has state: the model's tensors, one or two buffers per parameter
    (momentum; Adam's two moments), `averages` copies of the weights (lookahead's, the EMA's), and 1 MB for
    history, settings and RNG states."""
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers_per_parameter = 2 if optimizer_name in ("adam", "adamw") else 1
    average_bytes = state_bytes * averages
    return state_bytes + buffers_per_parameter * parameter_bytes + average_bytes + 1_000_000


def check_checkpoint_space(checkpoint_dir: Path, with_best: bool, parts: Parts, optimizer_name: str) -> None:
    """Refuse before the first epoch when the checkpoints cannot fit: their size is known from the model."""
    files = [LAST_CHECKPOINT] + ([BEST_CHECKPOINT] if with_best else [])
    missing = sum(not (checkpoint_dir / name).exists() for name in files)
    needed = (missing + 1) * expected_checkpoint_bytes(
        parts.model, optimizer_name, (parts.lookahead is not None) + (parts.ema is not None)
    )
    require_free_space(
        checkpoint_dir,
        needed,
        f"checkpoints ({', '.join(files)} and one being written)",
        hint="Free disk space or choose another --checkpoint-dir.",
    )

"""What a run leaves behind (TensorBoard events, `history.json`, settings) and the `Reporter` it talks to.

The training loop talks to a `Reporter` (display; the CLI's live ones are in `cifar_cli/ui/display.py`, with rich) and
a `RunLogger` (files) and never prints itself, so the same core runs quietly from Python, on non-zero ranks, or in
CI logs. Neither rich nor matplotlib is imported here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from cifar_cli.config.durations import format_duration
from cifar_cli.errors import UsageError
from cifar_cli.files import write_text_atomically

HISTORY_FILE = "history.json"
FINAL_METRICS_FILE = "final_metrics.json"
SETTINGS_FILE = "settings.yaml"  # the settings the run trained with: the request and its plan's choices
REQUEST_FILE = "request.yaml"  # what the user asked for (train/identity.py: PLAN_CHOICES are the difference)
PRUNED_FILE = "pruned.json"  # a sweep's pruner stopped the run: after which epoch, and why


class Reporter(Protocol):
    def message(self, text: str) -> None: ...
    def start_epoch(self, epoch: int, epochs: int, batches: int) -> None: ...
    def update_batch(self, done: int, stats: dict[str, float]) -> None: ...
    def end_epoch(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class EpochHook:
    """A reporter that also hands each finished epoch's record to `on_epoch` (a sweep's pruner listens), after the
    epoch's checkpoint is saved: an exception from `on_epoch` stops the run with that epoch kept."""

    def __init__(self, inner: Reporter, on_epoch: Callable[[dict[str, Any]], None]) -> None:
        self.inner, self.on_epoch = inner, on_epoch

    def message(self, text: str) -> None:
        self.inner.message(text)

    def start_epoch(self, epoch: int, epochs: int, batches: int) -> None:
        self.inner.start_epoch(epoch, epochs, batches)

    def update_batch(self, done: int, stats: dict[str, float]) -> None:
        self.inner.update_batch(done, stats)

    def end_epoch(self, record: dict[str, Any]) -> None:
        self.inner.end_epoch(record)
        self.on_epoch(record)

    def close(self) -> None:
        self.inner.close()


class NullReporter:
    """Says nothing: for library use and for every rank but 0."""

    def message(self, text: str) -> None:
        pass

    def start_epoch(self, epoch: int, epochs: int, batches: int) -> None:
        pass

    def update_batch(self, done: int, stats: dict[str, float]) -> None:
        pass

    def end_epoch(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def epoch_summary(record: dict[str, Any]) -> str:
    parts = [
        f"epoch {record['epoch']:>3}",
        f"train loss {record['train_loss']:.4f}",
        f"acc {record['train_accuracy']:.2%}",
    ]
    for split in ("val", "test"):  # test: a recipe without a validation split, shown but never read
        if record.get(f"{split}_loss") is not None:
            parts += [
                f"{split} loss {record[f'{split}_loss']:.4f}",
                f"acc {record[f'{split}_accuracy']:.2%}",
                f"f1 {record[f'{split}_f1']:.3f}",
            ]
    parts += [f"lr {record['lr']:.3g}", f"{record['images_per_second']:,.0f} img/s", f"{record['seconds']:.1f} s"]
    if record.get("remaining_seconds") is not None:
        parts.append(f"about {format_duration(record['remaining_seconds'])} left")
    return " | ".join(parts)


class RunLogger:
    """Files of one run in `run_dir`: TensorBoard events, `history.json`, the resolved `settings.yaml`."""

    def __init__(self, run_dir: Path, settings_yaml: str, tensorboard: bool) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.write_settings(settings_yaml)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir))

    def write_settings(self, settings_yaml: str) -> None:
        """The run's resolved settings; written again when a time budget re-plans the epochs."""
        write_text_atomically(self.run_dir / SETTINGS_FILE, settings_yaml)

    def log_epoch(self, record: dict[str, Any], history: list[dict[str, Any]], step: int) -> None:
        write_text_atomically(self.run_dir / HISTORY_FILE, json.dumps(history, indent=2))
        if self.writer is None:
            return
        for key, value in record.items():
            tag = _tensorboard_tag(key)
            if tag and isinstance(value, (int, float)) and value is not None:
                self.writer.add_scalar(tag, value, record["epoch"])
        self.writer.add_scalar("lr/step", record["lr"], step)
        self.writer.flush()

    def log_final(self, hparams: dict[str, Any], metrics: dict[str, Any], confusion_figure: Any | None) -> None:
        write_text_atomically(self.run_dir / FINAL_METRICS_FILE, json.dumps(metrics, indent=2))
        if self.writer is None:
            return
        if confusion_figure is not None:
            self.writer.add_figure("confusion_matrix", confusion_figure)
        scalars = {f"hparam/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.writer.add_hparams(hparams, scalars, run_name=".")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard_tag(key: str) -> str | None:
    """`train_loss` -> `loss/train`, `val_f1` -> `f1/val`, `test_f1` -> `f1/test`; `lr` -> `lr`; other keys are
    not scalars to plot."""
    if key == "lr":
        return "lr"
    split, _, metric = key.partition("_")
    if split in ("train", "val", "test") and metric in ("loss", "accuracy", "precision", "recall", "f1"):
        return f"{metric}/{split}"
    if key in ("images_per_second", "seconds"):
        return f"speed/{key}"
    return None


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The run's epoch records; a file that is not what `cifar train` writes is a clear error naming it."""
    path = run_dir / HISTORY_FILE
    if not path.is_file():
        return []
    try:
        history = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UsageError(f"{path} is damaged: {error}.", hint=DAMAGED_HINT) from None
    if not isinstance(history, list) or not all(_is_epoch_record(record) for record in history):
        raise UsageError(
            f"{path} is damaged: expected a list of epoch records (each with an integer 'epoch' and an 'lr').",
            hint=DAMAGED_HINT,
        )
    return history


DAMAGED_HINT = "The run's checkpoint holds the same history: `cifar plot CHECKPOINT.pth` draws from it."


def _is_epoch_record(record: object) -> bool:
    return (
        isinstance(record, dict) and isinstance(record.get("epoch"), int) and isinstance(record.get("lr"), (int, float))
    )

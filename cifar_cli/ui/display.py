"""The CLI's live displays of a run: plain lines (CI, files) or rich bars (a terminal), as `Reporter`s."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cifar_cli.config.durations import format_duration
from cifar_cli.train.tracking import NullReporter, Reporter, epoch_summary


class PlainReporter(NullReporter):
    """One line per epoch and per message: readable in CI logs and files."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def end_epoch(self, record: dict[str, Any]) -> None:
        self.console.print(epoch_summary(record), highlight=False)


class RichReporter(PlainReporter):
    """An epoch bar and a batch bar with live loss, accuracy, lr, images/s and the run's time left.

    The time left comes from the trainer (measured speeds, then this run's own batches), not from rich's bar rate:
    a step of 2,000 images can take a minute on a small CPU, long before rich has a rate to extrapolate."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[left]}"),
            console=console,
            transient=False,
        )
        self.epoch_task = self.batch_task = None

    def message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def start_epoch(self, epoch: int, epochs: int, batches: int) -> None:
        if self.epoch_task is None:
            self.progress.start()
            self.epoch_task = self.progress.add_task("epochs", total=epochs, completed=epoch - 1, stats="", left="")
            self.batch_task = self.progress.add_task("batches", total=batches, stats="", left="")
        self.progress.update(self.epoch_task, completed=epoch - 1, total=epochs)
        self.progress.reset(self.batch_task, total=batches, description=f"epoch {epoch}", stats="", left="")

    def update_batch(self, done: int, stats: dict[str, float]) -> None:
        text = f"loss {stats['loss']:.3f} acc {stats['accuracy']:.1%} lr {stats['lr']:.3g} {stats['images_per_second']:,.0f} img/s"
        self.progress.update(self.batch_task, completed=done, stats=text)
        self._show_left(stats.get("remaining_seconds"))

    def _show_left(self, seconds: float | None) -> None:
        if seconds is not None:
            self.progress.update(self.epoch_task, left=f"about {format_duration(seconds)} left")

    def end_epoch(self, record: dict[str, Any]) -> None:
        self.progress.update(self.epoch_task, completed=record["epoch"])
        self._show_left(record.get("remaining_seconds"))
        self.progress.console.print(epoch_summary(record), highlight=False)

    def close(self) -> None:
        self.progress.stop()


def make_reporter(mode: str, console: Console | None = None) -> Reporter:
    """`auto`: bars on a terminal, plain lines otherwise (CI); `none`: silent."""
    console = console or Console()
    if mode == "none":
        return NullReporter()
    if mode == "rich" or (mode == "auto" and console.is_terminal and not os.environ.get("CI")):
        return RichReporter(console)
    return PlainReporter(console)

"""The live display: a rich progress view that shows the run's time left, and the plain epoch lines."""

from __future__ import annotations

import io

from rich.console import Console

from cifar_cli.train.tracking import epoch_summary
from cifar_cli.ui.display import RichReporter

RECORD = {
    "epoch": 1,
    "train_loss": 1.5,
    "train_accuracy": 0.5,
    "val_loss": 1.2,
    "val_accuracy": 0.6,
    "val_f1": 0.6,
    "lr": 0.1,
    "images_per_second": 500.0,
    "seconds": 95.0,
}


def test_rich_display_shows_the_time_left_through_epochs() -> None:
    output = io.StringIO()
    reporter = RichReporter(Console(file=output, force_terminal=True, width=200))
    stats = {"loss": 1.0, "accuracy": 0.5, "lr": 0.1, "images_per_second": 400.0}
    for epoch in (1, 2):  # the second epoch resets the batch bar: its fields must survive that
        reporter.start_epoch(epoch, 2, 25)
        reporter.update_batch(5, {**stats, "remaining_seconds": 725.0})
        reporter.progress.refresh()
        reporter.end_epoch({**RECORD, "epoch": epoch, "remaining_seconds": 100.0})
    reporter.close()
    text = output.getvalue()
    assert "about 12 min 5 s left" in text and "about 1 min 40 s left" in text


def test_epoch_lines_end_with_the_time_left() -> None:
    assert epoch_summary({**RECORD, "remaining_seconds": 3725}).endswith("| about 1 h 2 min left")
    assert "left" not in epoch_summary(RECORD)

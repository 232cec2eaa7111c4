from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from cifar_cli.engine.train import train
from cifar_cli.errors import UsageError
from cifar_cli.plots import write_run_plots
from tests.conftest import tiny_settings

EXPECTED = ["curves.png", "confusion_matrix.png", "per_class.png", "predictions.png"]


def _check_png(path: Path, min_width: int = 400) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_width and image.height >= 300
        assert len(image.convert("L").getcolors(maxcolors=100_000) or []) > 10  # not a blank canvas


def test_curves_show_the_history_values() -> None:
    from cifar_cli.plots import curves_figure

    history = [
        {"epoch": e, "train_loss": 2.0 / e, "test_loss": 2.5 / e, "train_accuracy": 0.2 * e, "test_accuracy": 0.1 * e,
         "train_f1": 0.15 * e, "test_f1": 0.05 * e, "lr": 0.1 / e}
        for e in (1, 2, 3)
    ]  # fmt: skip
    figure = curves_figure(history)
    loss, accuracy, _f1, lr = figure.axes
    lines = {line.get_label(): list(line.get_ydata()) for line in loss.lines}
    assert lines == {"train": [2.0, 1.0, 2.0 / 3], "test": [2.5, 1.25, 2.5 / 3]}
    assert [list(line.get_xdata()) for line in accuracy.lines] == [[1, 2, 3]] * 2
    assert list(lr.lines[0].get_ydata()) == [0.1, 0.05, 0.1 / 3]
    assert all(float(tick).is_integer() for tick in loss.get_xticks())


def test_predictions_figure_marks_exactly_the_mistakes() -> None:
    import numpy as np

    from cifar_cli.plots import predictions_figure

    targets, predicted = [0, 1, 2, 3], [0, 5, 2, 7]
    figure = predictions_figure(
        np.zeros((4, 3, 32, 32), np.uint8), targets, predicted, [f"c{i}" for i in range(10)]
    )
    red = [axis.title.get_color() == "red" for axis in figure.axes[:4]]
    assert red == [False, True, False, True]


def test_plots_of_a_trained_run(tmp_path: Path, prepared_dir: Path) -> None:
    from cifar_cli.engine.evaluate import run_evaluation
    from cifar_cli.plots import _sample_predictions_figure

    settings = tiny_settings(tmp_path, prepared_dir, "train.tta=true")
    result = train(settings)
    # predictions.png shows the very predictions the confusion matrix counts (one pass, TTA as trained).
    evaluation = run_evaluation(result.checkpoint_dir / "last.pth", settings.data, device_name="cpu")
    confusion = evaluation.metrics["confusion_matrix"]
    counts = [[0] * 10 for _ in range(10)]
    for target, guess in zip(evaluation.targets.tolist(), evaluation.predicted.tolist()):
        counts[target][guess] += 1
    assert counts == confusion
    figure = _sample_predictions_figure(evaluation)
    shown = len(evaluation.targets)  # the tiny test split (30) is smaller than the 32-image sample
    wrong = int((evaluation.targets != evaluation.predicted).sum())
    assert sum(axis.title.get_color() == "red" for axis in figure.axes[:shown]) == wrong
    assert evaluation.metrics["tta"] is True
    for target in (result.run_dir, None, result.checkpoint_dir / "last.pth"):
        out = tmp_path / f"plots-{'x' if target is None else target.name}"
        written = write_run_plots(
            target, out, settings.log.log_dir, settings.log.checkpoint_dir, settings.data, "cpu"
        )
        assert [p.name for p in written] == EXPECTED
        for path in written:
            _check_png(path)


def test_run_without_checkpoint_draws_only_curves(tmp_path: Path, prepared_dir: Path) -> None:
    settings = tiny_settings(tmp_path, prepared_dir, "train.epochs=1")
    result = train(settings)
    for path in result.checkpoint_dir.iterdir():
        path.unlink()
    messages = []
    written = write_run_plots(
        result.run_dir,
        None,
        settings.log.log_dir,
        settings.log.checkpoint_dir,
        settings.data,
        "cpu",
        say=messages.append,
    )
    assert [p.name for p in written] == ["curves.png"] and "only the training curves" in messages[0]
    assert written[0].parent == result.run_dir / "plots"


def test_clear_errors_without_history(tmp_path: Path, prepared_dir: Path) -> None:
    settings = tiny_settings(tmp_path, prepared_dir)
    with pytest.raises(UsageError, match="No runs"):
        write_run_plots(None, None, tmp_path / "runs", tmp_path / "checkpoints", settings.data)
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(UsageError, match="has no history.json"):
        write_run_plots(
            tmp_path / "empty-run", None, tmp_path / "runs", tmp_path / "checkpoints", settings.data
        )

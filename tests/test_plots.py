from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from cifar_cli.errors import UsageError
from cifar_cli.train.run import train
from cifar_cli.ui.plots import write_run_plots
from tests.conftest import tiny_settings

EXPECTED = [
    "curves.png",
    "confusion_matrix.png",
    "per_class.png",
    "predictions.png",
    "mistakes.png",
    "reliability.png",
    "gradcam.png",
]


def _check_png(path: Path, min_width: int = 400) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_width and image.height >= 300
        assert len(image.convert("L").getcolors(maxcolors=100_000) or []) > 10  # not a blank canvas


def test_curves_show_the_history_values() -> None:
    from cifar_cli.ui.plots import curves_figure

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

    from cifar_cli.ui.plots import predictions_figure

    targets, predicted = [0, 1, 2, 3], [0, 5, 2, 7]
    figure = predictions_figure(np.zeros((4, 3, 32, 32), np.uint8), targets, predicted, [f"c{i}" for i in range(10)])
    red = [axis.title.get_color() == "red" for axis in figure.axes[:4]]
    assert red == [False, True, False, True]


def test_plots_of_a_trained_run(tmp_path: Path, prepared_dir: Path) -> None:
    from cifar_cli.predict.evaluate import run_evaluation
    from cifar_cli.ui.plots import _sample_predictions_figure

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
        written = write_run_plots(target, out, settings.log.log_dir, settings.log.checkpoint_dir, settings.data, "cpu")
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
        write_run_plots(tmp_path / "empty-run", None, tmp_path / "runs", tmp_path / "checkpoints", settings.data)


def test_mistakes_are_the_most_confidently_wrong_and_the_figure_names_them() -> None:
    from cifar_cli.predict.evaluate import Evaluation
    from cifar_cli.ui.plots_explain import mistakes_figure, most_confident_mistakes

    logits = torch.tensor([[5.0, 0.0], [0.0, 1.0], [0.0, 4.0], [2.0, 0.0], [0.0, 3.0]])
    targets = torch.tensor([0, 0, 0, 1, 1])  # wrong: 1 (p 0.73), 2 (p 0.98), 3 (p 0.88)
    evaluation = Evaluation({"class_names": ["cat", "dog"]}, torch.zeros(5, 3, 32, 32, dtype=torch.uint8), targets,
                            logits.argmax(1), logits, 1.0)  # fmt: skip
    assert most_confident_mistakes(evaluation, 10).tolist() == [2, 3, 1]
    titles = [axis.get_title() for axis in mistakes_figure(evaluation).axes if axis.get_title()]
    assert titles == ["true cat\n→ dog 98%", "true dog\n→ cat 88%", "true cat\n→ dog 73%"]


def test_gradcam_finds_the_evidence() -> None:
    """A network whose only evidence for class 0 is red light: the heat map's peak is inside the red square."""
    from torch import nn

    from cifar_cli.data.spec import CIFAR10_SPEC
    from cifar_cli.predict.gradcam import gradcam

    model = nn.Sequential(nn.Conv2d(3, 1, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))
        model[3].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    images[0, 0, 2:10, 20:28] = 255  # top right
    images[1, 0, 22:30, 3:11] = 255  # bottom left
    heat = gradcam(model, images, CIFAR10_SPEC, torch.tensor([0, 0]))
    assert heat.shape == (2, 32, 32) and float(heat.max()) == pytest.approx(1.0) and float(heat.min()) >= 0
    for map_, (rows, columns) in zip(heat, [(range(2, 10), range(20, 28)), (range(22, 30), range(3, 11))]):
        row, column = divmod(int(map_.argmax()), 32)
        assert row in rows and column in columns

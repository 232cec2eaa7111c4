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


def test_plots_of_a_trained_run(tmp_path: Path, prepared_dir: Path) -> None:
    settings = tiny_settings(tmp_path, prepared_dir)
    result = train(settings)
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

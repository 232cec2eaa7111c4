"""The shared full CIFAR-10 copy, when this machine has it: download, prepare, and a short real training run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cifar_cli.cli import app
from tests.conftest import SHARED_ARCHIVE, SHARED_MD5

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED_ARCHIVE.is_file(), reason=f"{SHARED_ARCHIVE} is not on this machine"),
]
runner = CliRunner()


@pytest.fixture(scope="module")
def real_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    paths = {"raw": root / "raw", "processed": root / "processed"}
    download = runner.invoke(
        app,
        ["download", "--url", SHARED_ARCHIVE.as_uri(), "--md5", SHARED_MD5, "--raw-dir", str(paths["raw"])],
    )
    assert download.exit_code == 0, download.output
    prepare = runner.invoke(
        app, ["prepare", "--raw-dir", str(paths["raw"]), "--processed-dir", str(paths["processed"])]
    )
    assert prepare.exit_code == 0, prepare.output
    return paths


def test_full_archive_counts(real_data: dict[str, Path]) -> None:
    manifest = json.loads((real_data["processed"] / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 50_000, "test": 10_000}
    assert set(manifest["per_class"]["train"].values()) == {5_000}
    assert set(manifest["per_class"]["test"].values()) == {1_000}
    for split, per_class in (("train", 5_000), ("test", 1_000)):
        for folder in (real_data["processed"] / split).iterdir():
            assert sum(1 for _ in folder.iterdir()) == per_class


def test_short_fast_run_learns(real_data: dict[str, Path], tmp_path: Path) -> None:
    # The fast recipe for one epoch at batch 256 (about 190 steps, lr scaled down with the batch), 2,000 held out.
    result = runner.invoke(
        app,
        ["train", "--preset", "fast", "--epochs", "1", "--batch-size", "256", "--lr", "0.4", "--val-size", "2000",
         "--device", "cpu", "--run-name", "real", "--processed-dir", str(real_data["processed"]),
         "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs"),
         "--set", "scheduler.warmup_epochs=0.2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    final = json.loads((tmp_path / "runs" / "real" / "final_metrics.json").read_text())
    assert final["accuracy"] > 0.5, final  # chance is 0.1

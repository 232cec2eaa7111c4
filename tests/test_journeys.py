"""The README's training examples, each run twice as a user would: the second command finds its run (finished,
or resumed) and ends 0, never refused as another recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import flat, run_cli


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("journey-source")
    result = run_cli("train", "--preset", "baseline", "--epochs", "1", "--processed-dir", prepared_dir, "--device",
                     "cpu", "--checkpoint-dir", folder / "ck", "--log-dir", folder / "runs", "--run-name", "source")  # fmt: skip
    assert result.exit_code == 0, result.output
    return folder / "ck" / "source" / "last.pth"


# The README's "One example per command" lines that train, shortened to one epoch of a small network; `{source}`
# is a trained checkpoint (a fine-tuning source, a teacher).
README_TRAINING = {
    "own data": ["--preset", "baseline"],
    "seeds (the guide)": ["--preset", "baseline", "--seeds", "0-1"],
    "fine-tune": ["--preset", "baseline", "--init-from", "{source}", "--freeze-epochs", "1"],
    "class weights": ["--preset", "baseline", "--class-weights", "auto"],
    "distil": ["--teacher", "{source}", "--preset", "fast", "--set", "model.width_multiplier=0.25"],
    "EMA and mixing": ["--preset", "baseline", "--set", "train.ema.half_life_steps=300", "--set",
                       "train.augment.mixup=0.2", "--set", "train.augment.cutmix=1.0"],
}  # fmt: skip


@pytest.mark.parametrize("example", list(README_TRAINING))
def test_a_readme_training_command_twice_ends_0(tmp_path: Path, prepared_dir: Path, source: Path, example: str) -> None:
    args = [arg.format(source=source) for arg in README_TRAINING[example]]
    common = ["--epochs", "1", "--processed-dir", prepared_dir, "--device", "cpu", "--checkpoint-dir",
              tmp_path / "ck", "--log-dir", tmp_path / "runs", "--set", "train.precision=fp32"]  # fmt: skip
    first = run_cli("train", *args, *common)
    assert first.exit_code == 0, first.output
    again = run_cli("train", *args, *common)
    assert again.exit_code == 0 and "has already finished 1 epoch:" in flat(again.output), again.output

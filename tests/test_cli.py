"""The commands end to end through Typer's CliRunner: exit codes, messages, files, and no tracebacks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import run_cli


def invoke(*args: str, env: dict[str, str] | None = None):
    return run_cli(*args, env=env)


def test_version_and_help() -> None:
    assert invoke("--version").output.startswith("cifar ")
    for command in ("download", "prepare", "train", "evaluate", "predict", "plot", "bench", "config"):
        assert invoke(command, "--help").exit_code == 0


def test_config_show_applies_set_env_and_config(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  seed: 11\n")
    result = invoke(
        "config", "show", "--config", str(config), "--set", "optim.lr=0.02", env={"CIFAR_TRAIN__EPOCHS": "3"}
    )
    assert result.exit_code == 0
    assert "lr: 0.02" in result.output and "seed: 11" in result.output and "epochs: 3" in result.output


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["config", "show", "--set", "optim.lr=-1"], "optim.lr"),
        (["config", "show", "--set", "nope.x=1"], "unknown setting"),
        (["train", "--batch-size", "0"], "train.batch_size"),
        (["train", "--device", "tpu"], "train.device"),
        (["train", "--epochs", "many"], "--epochs"),
        (["train", "--lr", "fast"], "--lr"),
        (["train", "--optimizer", "rmsprop"], "optim.name"),
        (["evaluate", "missing.pth"], "No checkpoint at missing.pth"),
        (["evaluate", "{checkpoint}", "--split", "holdout"], "must be test, train or val"),
        (["prepare", "--raw-dir", "does-not-exist"], "No archive at"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(args: list[str], named: str, tiny_checkpoint: Path) -> None:
    """Each refusal is reached by its own check (a real checkpoint where the path is not the point)."""
    result = invoke(*[arg.format(checkpoint=tiny_checkpoint) for arg in args])
    assert result.exit_code == 2, result.output
    assert named in result.output, result.output


def test_settings_table_shows_field_problem_and_value() -> None:
    result = invoke("config", "show", "--set", "train.batch_size=0")
    assert result.exit_code == 2
    assert "train.batch_size" in result.output and "greater than or equal to 1" in result.output


def test_malformed_yaml_exit_2_with_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  epochs: 2\n   seed: 1\n")
    result = invoke("config", "show", "--config", str(config))
    assert result.exit_code == 2 and "line 3" in result.output


def test_download_prepare_train_evaluate_plot(tmp_path: Path, tiny_archive: Path) -> None:
    md5 = hashlib.md5(tiny_archive.read_bytes()).hexdigest()
    common = ["--raw-dir", str(tmp_path / "raw")]
    result = invoke("download", "--url", tiny_archive.as_uri(), "--md5", md5, *common)
    assert result.exit_code == 0 and "verified" in result.output
    assert "Nothing to do" in invoke("download", "--url", tiny_archive.as_uri(), "--md5", md5, *common).output
    processed = ["--processed-dir", str(tmp_path / "processed")]
    assert invoke("prepare", *common, *processed).exit_code == 0
    assert "Nothing to do" in invoke("prepare", *common, *processed).output

    paths = [*processed, "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs")]
    result = invoke(
        "train",
        "--preset",
        "baseline",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "0.002",
        "--precision",
        "fp32",
        "--run-name",
        "cli",
        "--seed",
        "3",
        *paths,
    )
    assert result.exit_code == 0, result.output
    assert "epoch   2" in result.output and "Final test accuracy" in result.output
    # baseline's plateau scheduler reads a validation metric: a tenth of the 100 training images was held out.
    assert "90 training images, 10 held out for validation" in " ".join(result.output.split())
    stored = (tmp_path / "runs" / "cli" / "settings.yaml").read_text()
    assert "lr: 0.002" in stored and "seed: 3" in stored and "batch_size: 16" in stored

    checkpoint = tmp_path / "ck" / "cli" / "best.pth"
    result = invoke("evaluate", str(checkpoint), "--json", str(tmp_path / "m.json"), "--device", "cpu", *processed)
    assert result.exit_code == 0 and "Confusion matrix" in result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_samples"] == 30 and metrics["split"] == "test"
    assert metrics["model"] == "seed-cnn" and metrics["epoch"] in (1, 2) and metrics["loss"] > 0
    for split, count in (("val", 10), ("train", 90)):
        result = invoke("evaluate", str(checkpoint), "--split", split, "--json", str(tmp_path / f"{split}.json"),
                        "--device", "cpu", *processed)  # fmt: skip
        assert result.exit_code == 0, result.output
        assert f"{split} split, {count} images" in " ".join(result.output.split())
        assert json.loads((tmp_path / f"{split}.json").read_text())["num_samples"] == count

    result = invoke(
        "plot",
        "--out",
        str(tmp_path / "plots"),
        "--log-dir",
        str(tmp_path / "runs"),
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        *processed,
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(
        ["curves.png", "confusion_matrix.png", "per_class.png", "predictions.png", "mistakes.png",
         "reliability.png", "gradcam.png"]
    )  # fmt: skip
    # The run folder alone: its settings.yaml leads to its own checkpoint and data (no --checkpoint-dir here).
    result = invoke("plot", str(tmp_path / "runs" / "cli"), "--out", str(tmp_path / "again"))
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "again").iterdir())) == 7, result.output


def test_download_checksum_error_is_exit_1_with_hint(tmp_path: Path, tiny_archive: Path) -> None:
    result = invoke("download", "--url", str(tiny_archive), "--md5", "0" * 32, "--raw-dir", str(tmp_path))
    assert result.exit_code == 1 and "checksum mismatch" in result.output and "--url" in result.output
    assert not any(tmp_path.iterdir())


def test_train_prepares_missing_data_first(tmp_path: Path, tiny_archive: Path) -> None:
    md5 = hashlib.md5(tiny_archive.read_bytes()).hexdigest()
    result = invoke(
        "train",
        "--preset",
        "baseline",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--precision",
        "fp32",
        "--raw-dir",
        str(tmp_path / "raw"),
        "--processed-dir",
        str(tmp_path / "processed"),
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        "--log-dir",
        str(tmp_path / "runs"),
        "--set",
        f"data.urls=[{tiny_archive}]",
        "--set",
        f"data.md5={md5}",
    )
    assert result.exit_code == 0, result.output
    assert "downloading and preparing it first" in result.output
    assert (tmp_path / "processed" / "cache.pt").is_file()

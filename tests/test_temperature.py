"""Calibration: the expected calibration error, temperature scaling fitted on the validation split only, and the
temperature carried by the checkpoint into `evaluate`, `predict` and `export`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifar_cli.checkpoint import load_checkpoint
from cifar_cli.predict.metrics import expected_calibration_error, reliability_bins
from cifar_cli.predict.temperature import fit_temperature
from cifar_cli.train.run import train
from tests.conftest import flat, run_cli, tiny_settings


def invoke(*args: object):
    return run_cli(*args)


def test_ece_of_known_cases() -> None:
    # Three images at confidence 0.9 (two right), one at 0.6 (right): |2/3 - 0.9| for three quarters of the images,
    # |1 - 0.6| for one quarter.
    probabilities = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    targets = torch.tensor([0, 0, 1, 1])
    assert expected_calibration_error(probabilities, targets) == pytest.approx(0.75 * (0.9 - 2 / 3) + 0.25 * 0.4)
    bins = [row for row in reliability_bins(probabilities, targets) if row["count"]]
    assert [(row["count"], row["accuracy"]) for row in bins] == [(1, 1.0), (3, pytest.approx(2 / 3))]
    confident_and_right = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(confident_and_right, torch.tensor([0, 1])) == 0


def test_fit_temperature_recovers_the_temperature_that_made_the_labels() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(20_000, 10, generator=generator)
    for true_temperature in (0.5, 2.5):
        targets = torch.multinomial(torch.softmax(logits / true_temperature, 1), 1, generator=generator)[:, 0]
        assert fit_temperature(logits, targets) == pytest.approx(true_temperature, rel=0.05)
        overconfident = torch.softmax(logits, 1)
        scaled = torch.softmax(logits / fit_temperature(logits, targets), 1)
        assert expected_calibration_error(scaled, targets) < expected_calibration_error(overconfident, targets)


def test_calibrate_stores_a_temperature_that_evaluate_predict_and_export_use(
    tmp_path: Path, prepared_dir: Path
) -> None:
    checkpoint = train(tiny_settings(tmp_path, prepared_dir, "data.val_size=20")).checkpoint_dir / "last.pth"
    image = next((prepared_dir / "test").rglob("*.png"))
    before = json.loads(invoke("predict", checkpoint, image, "--json", "-", "--top-k", "10").output)["images"][0]["top"]
    invoke("evaluate", checkpoint, "--json", tmp_path / "plain.json", "--device", "cpu")
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert plain["temperature"] is None and "ece_calibrated" not in plain and 0 <= plain["ece"] <= 1
    result = invoke("calibrate", checkpoint, "--json", tmp_path / "cal.json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "cal.json").read_text())
    stored = load_checkpoint(checkpoint)["temperature"]
    assert stored["value"] == figures["temperature"] and stored["fitted_on"] == "val" and stored["images"] == 20
    assert figures["val_nll_after"] <= figures["val_nll_before"] + 1e-9  # the fit can only lower what it minimised
    temperature = stored["value"]
    # predict divides the logits by it: log-probability differences shrink by exactly the temperature.
    after = json.loads(invoke("predict", checkpoint, image, "--json", "-", "--top-k", "10").output)["images"][0]["top"]
    assert [t["class"] for t in after] == [t["class"] for t in before]

    def gap(top: list[dict]) -> float:
        return float(torch.log(torch.tensor(top[0]["probability"] / top[1]["probability"])))

    assert gap(after) == pytest.approx(gap(before) / temperature, rel=1e-3)
    result = invoke("evaluate", checkpoint, "--json", tmp_path / "eval.json", "--device", "cpu")
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["temperature"] == temperature
    assert metrics["ece"] == pytest.approx(figures["test_ece_before"])
    assert metrics["ece_calibrated"] == pytest.approx(figures["test_ece_after"])
    result = invoke("export", checkpoint, "--format", "pt2", "--out", tmp_path / "model.pt2")
    assert result.exit_code == 0, result.output
    from cifar_cli.predict.exported_model import load_exported

    assert load_exported(tmp_path / "model.pt2").contract["temperature"]["value"] == temperature
    refused = invoke("predict", tmp_path / "model.pt2", image, "--explain", tmp_path / "why")
    assert refused.exit_code == 2 and "Grad-CAM needs the model's layers" in flat(refused.output)
    exported = json.loads(invoke("predict", tmp_path / "model.pt2", image, "--json", "-", "--top-k", "10").output)
    assert gap(exported["images"][0]["top"]) == pytest.approx(gap(after), rel=1e-3)


def test_a_run_without_a_validation_split_is_told_how_to_get_one(tmp_path: Path, prepared_dir: Path) -> None:
    settings = tiny_settings(tmp_path, prepared_dir, "data.val_size=0", "scheduler.name=none", "train.epochs=1")
    checkpoint = train(settings).checkpoint_dir / "last.pth"
    result = invoke("calibrate", checkpoint, "--device", "cpu")
    assert result.exit_code == 2 and "held out no validation split" in flat(result.output)
    assert "--val-size" in result.output
    assert "temperature" not in load_checkpoint(checkpoint)


def test_calibrate_waits_for_a_running_training_and_a_resume_says_it_drops_the_temperature(
    tmp_path: Path, prepared_dir: Path
) -> None:
    """A real second process trains the run: calibrate is refused (its temperature would be written over by the
    next epoch's save); once the training stopped it calibrates, and a resume says that the temperature goes."""
    import os
    import signal
    import subprocess

    from cifar_cli.train.state import DROPPED_TEMPERATURE
    from tests.test_faults import ENV, LONG_RUN, _start_and_wait_for_epoch, _train_command

    last = tmp_path / "ck" / "owned" / "last.pth"
    training = _start_and_wait_for_epoch(_train_command(tmp_path, prepared_dir, LONG_RUN), tmp_path, last, 1)
    try:
        refused = invoke("calibrate", last, "--device", "cpu")
        assert training.poll() is None  # still training: the refusal is the lock's doing
        os.kill(training.pid, signal.SIGINT)
        training.communicate(timeout=120)
    finally:
        training.kill()
    assert refused.exit_code == 2, refused.output
    assert f"in use by process {training.pid}" in flat(refused.output) and "Calibrate once" in flat(refused.output)
    assert "temperature" not in load_checkpoint(last)
    calibrated = invoke("calibrate", last, "--device", "cpu")
    assert calibrated.exit_code == 0, calibrated.output
    done = load_checkpoint(last)["epoch"]
    assert load_checkpoint(last)["temperature"]["value"] > 0
    command = _train_command(tmp_path, prepared_dir, done + 1)
    again = subprocess.run(command, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert " ".join(DROPPED_TEMPERATURE.split()) in " ".join(again.stdout.split())
    assert "temperature" not in load_checkpoint(last)


def test_budget_runs_hold_out_a_calibration_split_unless_told_otherwise() -> None:
    from cifar_cli.config.settings import load_settings, parse_set_options, resolve_val_size

    def held_out(*assignments: str) -> int:
        return resolve_val_size(load_settings(None, parse_set_options(["preset=fast", *assignments])), 50_000)

    assert held_out("train.time_budget=15m") == 2_000  # `make run`: calibrated probabilities by default
    assert held_out() == 0  # a run of fixed epochs of a recipe that monitors nothing
    assert held_out("train.calibrate=true") == 2_000
    assert held_out("train.time_budget=15m", "train.calibrate=false") == 0
    assert held_out("train.time_budget=15m", "data.val_size=500") == 500


def test_a_calibrating_run_fits_its_temperature_on_the_held_out_images_at_the_end(
    tmp_path: Path, prepared_dir: Path
) -> None:
    """The temperature in last.pth is the one that minimises the held-out images' NLL under the final (TTA)
    scoring, computed again here from the checkpoint; the final metrics carry the test ECE before and after."""
    from cifar_cli.config.sections import DataSettings
    from cifar_cli.predict.evaluate import run_evaluation

    settings = tiny_settings(tmp_path, prepared_dir, "scheduler.name=none", "train.calibrate=true", "train.epochs=1")
    result = train(settings)
    checkpoint = result.checkpoint_dir / "last.pth"
    stored = load_checkpoint(checkpoint)
    record = stored["temperature"]
    assert stored["settings"]["data"]["val_size"] == record["images"] == 10  # a tenth of the 100 tiny images
    assert record["fitted_by"] == "cifar train" and record["fitted_on"] == "val"
    val = run_evaluation(checkpoint, DataSettings(processed_dir=prepared_dir), "val", device_name="cpu")
    assert record["value"] == pytest.approx(fit_temperature(val.logits, val.targets), rel=1e-4)
    final = result.final_metrics
    assert final["temperature"] == record["value"] and 0 <= final["ece_calibrated"] <= 1 and 0 <= final["ece"] <= 1
    # Without a held-out split there is nothing to fit on: no temperature, and the run says nothing about one.
    plain = train(tiny_settings(tmp_path / "b", prepared_dir, "scheduler.name=none", "train.epochs=1"))
    assert "temperature" not in load_checkpoint(plain.checkpoint_dir / "last.pth")
    assert "ece_calibrated" not in plain.final_metrics


def test_with_selective_tta_the_temperature_and_its_errors_are_those_of_every_view(
    tmp_path: Path, prepared_dir: Path
) -> None:
    """`predict` and exports score every image with every view and apply the temperature there: it is fitted on
    the held-out images scored that way, and the test ECE is of those probabilities (not the selective pass's)."""
    from cifar_cli.config.sections import DataSettings
    from cifar_cli.predict.evaluate import run_evaluation
    from cifar_cli.predict.metrics import expected_calibration_error

    settings = tiny_settings(tmp_path, prepared_dir, "model.name=airbench", "model.width_multiplier=0.25",
                             "train.tta=true", "train.tta_share=0.3", "train.calibrate=true", "train.epochs=1")  # fmt: skip
    result = train(settings)
    checkpoint = result.checkpoint_dir / "last.pth"
    record = load_checkpoint(checkpoint)["temperature"]
    data = DataSettings(processed_dir=prepared_dir)
    every_view = run_evaluation(checkpoint, data, "val", device_name="cpu", tta_share=1.0)
    assert record["value"] == pytest.approx(fit_temperature(every_view.logits, every_view.targets), rel=1e-4)
    test = run_evaluation(checkpoint, data, "test", device_name="cpu", tta_share=1.0)
    scaled = torch.softmax(test.logits.double() / record["value"], dim=1)
    assert result.final_metrics["tta_share"] == 0.3
    assert result.final_metrics["ece_calibrated"] == pytest.approx(expected_calibration_error(scaled, test.targets))

"""Options that only the command line reaches, each through the real command: a label set, bad images skipped,
a fixed export batch, random draws and time budgets of a sweep, and a validation split that a run does not have."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from tests.conftest import COARSE_NAMES, build_cifar100_archive, flat, run_cli, write_image_tree

TINY = ["--device", "cpu", "--set", "train.batch_size=16", "--set", "train.num_threads=1",
        "--set", "train.precision=fp32", "--set", "log.progress=none"]  # fmt: skip


def invoke(*args: object):
    return run_cli(*args)


def test_prepare_label_set_coarse_gives_the_20_superclasses(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    build_cifar100_archive(raw / "cifar-100-python.tar.gz")
    result = invoke("prepare", "--dataset", "cifar100", "--label-set", "coarse", "--raw-dir", raw,
                    "--processed-dir", tmp_path / "c100", "--no-png")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "20 classes" in flat(result.output)
    manifest = json.loads((tmp_path / "c100" / "manifest.json").read_text())
    assert manifest["label_set"] == "coarse" and manifest["class_names"] == COARSE_NAMES


def test_prepare_skip_bad_images_goes_on_and_says_how_many(tmp_path: Path) -> None:
    source = write_image_tree(tmp_path / "imgs", {"a": 6, "b": 6}, suffix=".jpg")
    (source / "b" / "003.jpg").write_bytes(b"not a jpeg")
    refused = invoke("prepare", "--from-folder", source, "--processed-dir", tmp_path / "strict", "--no-png")
    assert refused.exit_code != 0 and "003.jpg" in flat(refused.output)
    result = invoke("prepare", "--from-folder", source, "--processed-dir", tmp_path / "lenient", "--no-png",
                    "--skip-bad-images")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Skipped 1 unreadable" in flat(result.output)
    assert sum(json.loads((tmp_path / "lenient" / "manifest.json").read_text())["counts"].values()) == 11


def _train(tmp_path: Path, prepared_dir: Path, name: str, *extra: object) -> Path:
    result = invoke("train", "--preset", "baseline", "--epochs", "1", "--processed-dir", prepared_dir,
                    "--log-dir", tmp_path / "runs", "--checkpoint-dir", tmp_path / "ck", "--run-name", name,
                    *TINY, *extra)  # fmt: skip
    assert result.exit_code == 0, result.output
    return tmp_path / "ck" / name / "last.pth"


def test_evaluate_split_val_is_refused_for_a_run_that_held_none_out(tmp_path: Path, prepared_dir: Path) -> None:
    without = _train(tmp_path, prepared_dir, "no-val", "--val-size", "0", "--scheduler", "none")
    refused = invoke("evaluate", without, "--split", "val")
    assert refused.exit_code == 2 and "held out no validation split" in flat(refused.output)
    with_val = _train(tmp_path, prepared_dir, "val", "--val-size", "20")
    scored = invoke("evaluate", with_val, "--split", "val", "--json", tmp_path / "val.json")
    assert scored.exit_code == 0 and json.loads((tmp_path / "val.json").read_text())["num_samples"] == 20


def test_export_batch_n_fixes_the_batch_in_the_contract(tmp_path: Path, prepared_dir: Path) -> None:
    from cifar_cli.predict.exported_model import load_exported

    checkpoint = _train(tmp_path, prepared_dir, "fixed")
    result = invoke("export", checkpoint, "--format", "pt2", "--batch", "7", "--out", tmp_path / "b7.pt2")
    assert result.exit_code == 0, result.output
    contract = load_exported(tmp_path / "b7.pt2").contract
    assert contract["input"]["shape"][0] == 7 and contract["output"]["shape"][0] == 7
    assert invoke("export", checkpoint, "--batch", "0").exit_code == 2


def _sweep(tmp_path: Path, prepared_dir: Path, name: str, *extra: object):
    return invoke("sweep", "--preset", "baseline", "--set", "optim.lr=0.001,0.002,0.003", "--epochs", "1",
                  "--name", name, "--processed-dir", prepared_dir, "--log-dir", tmp_path / "runs",
                  "--checkpoint-dir", tmp_path / "ck", "--device", "cpu", *extra)  # fmt: skip


def test_sweep_samples_draws_that_many_trials_of_the_grid(tmp_path: Path, prepared_dir: Path, monkeypatch) -> None:
    for key, value in (("BATCH_SIZE", "16"), ("NUM_THREADS", "1"), ("PRECISION", "fp32")):
        monkeypatch.setenv(f"CIFAR_TRAIN__{key}", value)
    monkeypatch.setenv("CIFAR_LOG__PROGRESS", "none")
    result = _sweep(tmp_path, prepared_dir, "drawn", "--samples", "2")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "runs" / "sweeps" / "drawn" / "sweep.json").read_text())
    drawn = [recipe["optim.lr"] for recipe in document["recipes"]]
    assert len(drawn) == 2 and set(drawn) < {0.001, 0.002, 0.003}
    again = _sweep(tmp_path / "second", prepared_dir, "drawn", "--samples", "2")  # seeded: the same draws
    document = json.loads((tmp_path / "second" / "runs" / "sweeps" / "drawn" / "sweep.json").read_text())
    assert again.exit_code == 0 and sorted(r["optim.lr"] for r in document["recipes"]) == sorted(drawn)


def test_sweep_time_budget_is_each_trials_budget(tmp_path: Path, prepared_dir: Path, monkeypatch) -> None:
    for key, value in (("BATCH_SIZE", "16"), ("NUM_THREADS", "1"), ("PRECISION", "fp32")):
        monkeypatch.setenv(f"CIFAR_TRAIN__{key}", value)
    monkeypatch.setenv("CIFAR_LOG__PROGRESS", "none")
    # A CPU budget's own activation: a plan choice, which a rerun of the same sweep must not take for another recipe.
    budget = ("--samples", "1", "--time-budget", "20s", "--set", "model.name=airbench", "--set",
              "model.width_multiplier=0.25", "--set", "model.cpu_budget_activation=silu")  # fmt: skip
    result = _sweep(tmp_path, prepared_dir, "budget", *budget)
    assert result.exit_code == 0, result.output
    folder = tmp_path / "runs" / "sweeps" / "budget"
    [trial] = [path for path in folder.iterdir() if (path / "settings.yaml").is_file()]
    assert yaml.safe_load((trial / "settings.yaml").read_text())["train"]["time_budget"] == 20.0
    assert yaml.safe_load((trial / "settings.yaml").read_text())["model"]["activation"] == "silu"
    plan = json.loads((trial / "plan.json").read_text())
    assert plan["budget_seconds"] == 20.0
    again = _sweep(tmp_path, prepared_dir, "budget", *budget)
    assert again.exit_code == 0, again.output
    shutil.rmtree(tmp_path / "ck")


def test_lr_on_a_recipe_with_several_rates_says_what_it_reached(tmp_path: Path, prepared_dir: Path) -> None:
    """`cifar train --lr 0.001` on `fast` moves only the head and biases (the filters follow optim.muon_lr):
    the user is told, and told which setting moves the rest."""
    tiny = ["train", "--preset", "fast", "--epochs", "1", "--device", "cpu", "--precision", "fp32",
            "--processed-dir", prepared_dir, "--checkpoint-dir", tmp_path / "ck", "--log-dir", tmp_path / "runs",
            "--set", "train.channels_last=true", "--set", "model.width_multiplier=0.25",
            "--set", "train.batch_size=16", "--set", "log.progress=none"]  # fmt: skip
    told = flat(invoke(*tiny, "--lr", "0.001").output)
    assert "--lr 0.001 sets the step size of the classifier head" in told
    assert "biases and normalisation take 64x it" in told and "--set optim.muon_lr=" in told
    assert "sets the step size" in flat(invoke(*tiny, "--set", "optim.lr=0.002").output)
    for quiet in (invoke(*tiny), invoke(*tiny[:1], *tiny[3:], "--preset", "baseline", "--lr", "0.001")):
        assert quiet.exit_code == 0 and "sets the step size" not in flat(quiet.output)  # no --lr; one rate

"""`cifar export`: every registered model to ONNX and .pt2, verified, and usable by evaluate and predict."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cifar_cli.config.sections import MODEL_RECIPES, DataSettings
from cifar_cli.data.prepare import CLASS_NAMES
from cifar_cli.errors import CifarError, UsageError
from cifar_cli.export import writer as export_module
from cifar_cli.export.writer import export_checkpoint
from cifar_cli.predict import exported_model as exported_module
from cifar_cli.predict.classify import classify_files, load_classifier
from cifar_cli.predict.evaluate import run_evaluation
from cifar_cli.predict.exported_model import load_exported
from cifar_cli.train.run import train
from tests.conftest import flat, run_cli, tiny_settings

HAS_ONNX = all(importlib.util.find_spec(name) for name in exported_module.ONNX_PACKAGES)
needs_onnx = pytest.mark.skipif(
    not HAS_ONNX, reason="the [export] extra (onnx, onnxscript, onnxruntime) is not installed"
)


def predict_images(checkpoint: Path, paths: list[Path], top_k: int = 3, device_name: str = "auto") -> list[dict]:
    """What `cifar predict` computes for these files: top-k classes with probabilities."""
    return classify_files(load_classifier(checkpoint, device_name), paths, top_k).rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> dict[str, Path]:
    """One epoch of every registered model on the tiny data (airbench's whitening bias trains, then freezes)."""
    folder = tmp_path_factory.mktemp("export")
    checkpoints = {}
    for model in MODEL_RECIPES:
        settings = tiny_settings(
            folder, prepared_dir, f"model.name={model}", "model.width_multiplier=0.25", "train.epochs=1",
            "train.tta=true", "train.lookahead=true", "scheduler.name=cosine", f"train.run_name={model}",
        )  # fmt: skip
        checkpoints[model] = train(settings).checkpoint_dir / "last.pth"
    return checkpoints


@pytest.mark.parametrize("fmt", [pytest.param("onnx", marks=needs_onnx), "pt2"])
@pytest.mark.parametrize("model", list(MODEL_RECIPES))
def test_every_model_exports_and_matches_its_checkpoint(
    trained: dict[str, Path], prepared_dir: Path, tmp_path: Path, model: str, fmt: str
) -> None:
    data = DataSettings(processed_dir=prepared_dir)
    result = export_checkpoint(trained[model], data, fmt, tmp_path / f"m.{fmt}")
    assert result.top1_agreement == 1.0 and result.relative_difference <= 1e-4
    assert result.accuracy == result.checkpoint_accuracy
    contract = load_exported(result.path).contract
    assert contract["model"] == model and contract["tta_level"] == 2 and contract["normalisation_inside"]
    assert contract["input"]["range"] == [0.0, 1.0] and len(contract["class_names"]) == 10
    # evaluate reads the export with its own runtime and agrees with the checkpoint (TTA as trained)
    exported = run_evaluation(result.path, data, device_name="cpu").metrics
    original = run_evaluation(trained[model], data, device_name="cpu").metrics
    assert exported["accuracy"] == pytest.approx(original["accuracy"], abs=1 / 30 + 1e-9)
    assert exported["num_samples"] == 30 and exported["tta"] is True


@needs_onnx
def test_fixed_batch_and_no_tta(trained: dict[str, Path], prepared_dir: Path, tmp_path: Path) -> None:
    data = DataSettings(processed_dir=prepared_dir)
    result = export_checkpoint(trained["seed-cnn"], data, "onnx", tmp_path / "b8.onnx", batch=8, tta=False)
    contract = result.contract
    assert contract["input"]["shape"] == [8, 3, 32, 32] and contract["tta_level"] == 0
    metrics = run_evaluation(result.path, data).metrics  # 30 test images in batches of 8, the last one padded
    assert metrics["num_samples"] == 30 and metrics["tta"] is False
    with pytest.raises(UsageError, match="fixed inside this exported model"):
        run_evaluation(result.path, data, tta=True)


def test_selective_tta_is_refused_for_an_export_whose_graph_scores_every_view(
    trained: dict[str, Path], prepared_dir: Path, tmp_path: Path
) -> None:
    exported = tmp_path / "model.pt2"
    assert run_cli("export", trained["seed-cnn"], "--format", "pt2", "--out", exported,
                   "--processed-dir", prepared_dir).exit_code == 0  # fmt: skip
    result = run_cli("evaluate", exported, "--processed-dir", prepared_dir, "--tta-share", "0.25")
    assert result.exit_code == 2 and "--tta-share 0.25 cannot apply" in flat(result.output), result.output
    result = run_cli("evaluate", exported, "--processed-dir", prepared_dir, "--json", "-")
    assert result.exit_code == 0 and json.loads(result.stdout)["tta_share"] in (0.0, 1.0), result.output


def test_predict_reads_an_exported_program(trained: dict[str, Path], prepared_dir: Path, tmp_path: Path) -> None:
    data = DataSettings(processed_dir=prepared_dir)
    program = export_checkpoint(trained["airbench"], data, "pt2", tmp_path / "a.pt2").path
    image = next((prepared_dir / "test").rglob("*.png"))
    [from_export] = predict_images(program, [image], top_k=3)
    [from_checkpoint] = predict_images(trained["airbench"], [image], top_k=3, device_name="cpu")
    assert [e["class"] for e in from_export["top"]] == [e["class"] for e in from_checkpoint["top"]]
    assert from_export["top"][0]["probability"] == pytest.approx(from_checkpoint["top"][0]["probability"], abs=1e-4)


def test_a_disagreeing_export_is_deleted_and_refused(
    trained: dict[str, Path], prepared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = export_module.load_exported

    def off_by_a_little(path: Path) -> exported_module.Exported:
        exported = real(path)
        return exported_module.Exported(lambda pixels: exported.run(pixels) * 1.01, exported.contract)

    data = DataSettings(processed_dir=prepared_dir)
    out = tmp_path / "model.pt2"
    export_checkpoint(trained["seed-cnn"], data, "pt2", out)  # an earlier, good export at the same path
    good = out.read_bytes()
    monkeypatch.setattr(export_module, "load_exported", off_by_a_little)
    with pytest.raises(CifarError, match="does not match the checkpoint"):
        export_checkpoint(trained["seed-cnn"], data, "pt2", out)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"] and out.read_bytes() == good
    monkeypatch.undo()
    assert load_exported(out).contract["class_names"] == CLASS_NAMES  # still the good one, whole


def test_the_checkpoint_is_never_an_export_target(trained: dict[str, Path], prepared_dir: Path, tmp_path: Path) -> None:
    """`cifar export ck/last.pth --out ck/last.pth` used to overwrite the checkpoint with ONNX bytes, then delete it
    when the check failed."""
    checkpoint = tmp_path / "one" / "last.pth"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(trained["seed-cnn"].read_bytes())
    original = checkpoint.read_bytes()
    for out in (checkpoint, tmp_path / "one" / "." / "last.pth", tmp_path / "other.pth"):
        result = run_cli("export", checkpoint, "--format", "pt2", "--out", out, "--processed-dir", prepared_dir)
        assert result.exit_code == 2 and "would overwrite" in flat(result.output), result.output
    assert checkpoint.read_bytes() == original and sorted(p.name for p in tmp_path.rglob("*")) == ["last.pth", "one"]


def test_bad_inputs_get_clear_errors(trained: dict[str, Path], prepared_dir: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = {
        "not a checkpoint": ([str(notes)], 2),
        "unknown format": ([str(trained["seed-cnn"]), "--format", "tflite"], 2),
        "bad batch": ([str(trained["seed-cnn"]), "--batch", "zero"], 2),
        "unwritable output": ([str(trained["seed-cnn"]), "--format", "pt2", "--out", str(blocker / "m.pt2")], 1),
        "a suffix of another format": ([str(trained["seed-cnn"]), "--format", "pt2", "--out", "model.onnx"], 2),
    }
    for case, (args, code) in cases.items():
        result = run_cli("export", *args, "--processed-dir", str(prepared_dir))
        assert result.exit_code == code, (case, result.output)
        if case == "unwritable output":
            assert "a-file is a file, not a folder" in flat(result.output)  # named
    assert "--out model.pt2, or --format onnx" in flat(result.output)  # a .pt2 named .onnx: predict would refuse it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "notes.txt"]
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(b"\x08\x01garbage")
    assert run_cli("evaluate", str(damaged), "--processed-dir", str(prepared_dir)).exit_code == 2


def test_missing_onnx_packages_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    real = exported_module.importlib.util.find_spec
    monkeypatch.setattr(
        exported_module.importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name)
    )
    with pytest.raises(UsageError, match="needs onnxruntime") as raised:
        exported_module.require_onnx()
    assert "[export]" in raised.value.hint


@needs_onnx
def test_cli_export_prints_the_verification(trained: dict[str, Path], prepared_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.onnx"
    result = run_cli(*["export", str(trained["seed-cnn"]), "--out", str(out), "--processed-dir", str(prepared_dir)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Verified against the checkpoint on 30 test images" in text and "top-1 agreement 100.00%" in text
    assert load_exported(out).contract["class_names"] == CLASS_NAMES


@needs_onnx
def test_bench_times_the_three_runtimes_in_one_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from cifar_cli import bench
    from cifar_cli.bench import runtimes

    monkeypatch.setattr(runtimes, "LATENCY_RUNS", 3)
    options = bench.BenchOptions(batches=1, min_seconds=0.0, warmup=1)
    results = bench.bench_export_runtimes(options, model_name="seed-cnn")
    names = [row["runtime"] for row in results["rows"]]
    assert names == ["eager (torch, fp32)", "torch.export program (.pt2)", "ONNX Runtime (CPU provider)"]
    for row in results["rows"]:
        assert row["latency_ms_batch_1"] > 0 and row["images_per_second_batch_256"] > 0

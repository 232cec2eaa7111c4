from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_cli.checkpoint import load_checkpoint
from cifar_cli.errors import UsageError
from cifar_cli.predict.classify import classify_files, load_classifier
from cifar_cli.predict.evaluate import run_evaluation
from cifar_cli.predict.metrics import classification_report
from cifar_cli.train.run import train
from tests.conftest import run_cli, tiny_settings

NAMES = [f"c{i}" for i in range(10)]


def predict_images(checkpoint: Path, paths: list[Path], top_k: int = 3, device_name: str = "auto") -> list[dict]:
    """What `cifar predict` computes for these files: top-k classes with probabilities."""
    return classify_files(load_classifier(checkpoint, device_name), paths, top_k).rows


def test_metrics_match_a_hand_computation() -> None:
    # Class 0: 3 samples, 2 right (one predicted as 1). Class 1: 2 samples, both right. Class 2: 1 sample, predicted 0.
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 0, 1, 1, 1, 0])
    report = classification_report(predicted, targets, NAMES)
    assert report.accuracy == pytest.approx(4 / 6)
    # precision: c0 2/3, c1 2/3, c2 0 (nothing predicted); recall: c0 2/3, c1 1, c2 0
    assert report.per_class["c0"]["precision"] == pytest.approx(2 / 3)
    assert report.per_class["c1"]["precision"] == pytest.approx(2 / 3)
    assert report.per_class["c1"]["recall"] == pytest.approx(1.0)
    assert report.per_class["c2"]["recall"] == 0.0
    assert report.per_class["c0"]["support"] == 3
    f1 = [2 * (2 / 3) * (2 / 3) / (4 / 3), 2 * (2 / 3) * 1 / (5 / 3), 0.0]
    # Macro averages are over the classes present in targets or predictions (torchmetrics' rule).
    assert report.f1_macro == pytest.approx(sum(f1) / 3)
    assert report.recall_macro == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert report.precision_macro == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert report.confusion_matrix[0][:3] == [2, 1, 0] and report.confusion_matrix[2][:3] == [1, 0, 0]


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    result = train(tiny_settings(folder, prepared_dir, "train.epochs=2", "train.tta=true"))
    return result.checkpoint_dir / "best.pth"


def test_evaluate_checkpoint_json(trained_checkpoint: Path, prepared_dir: Path) -> None:
    from cifar_cli.config.sections import DataSettings

    metrics = run_evaluation(trained_checkpoint, DataSettings(processed_dir=prepared_dir), "test", tta=True).metrics
    assert {
        "accuracy",
        "precision_macro",
        "recall_macro",
        "f1_macro",
        "per_class",
        "confusion_matrix",
        "checkpoint",
        "split",
        "tta",
        "num_samples",
    } <= set(metrics)
    assert metrics["num_samples"] == 30 and metrics["tta"] is True and metrics["split"] == "test"
    assert 0 <= metrics["accuracy"] <= 1 and len(metrics["confusion_matrix"]) == 10
    assert sum(map(sum, metrics["confusion_matrix"])) == 30
    correct = sum(metrics["confusion_matrix"][i][i] for i in range(10))
    assert metrics["accuracy"] == pytest.approx(correct / 30)
    json.dumps(metrics)


def test_predict_images(trained_checkpoint: Path, prepared_dir: Path) -> None:
    image = next((prepared_dir / "test").rglob("*.png"))
    [result] = predict_images(trained_checkpoint, [image], top_k=3, device_name="cpu")
    probabilities = [entry["probability"] for entry in result["top"]]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1.0001


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


class _Payload:
    def __reduce__(self):  # noqa: ANN204
        import os

        return (os.system, ("touch pwned-by-checkpoint",))


def test_bad_checkpoints_are_refused(tmp_path: Path, trained_checkpoint: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(trained_checkpoint.read_bytes()[:5000])
    state = load_checkpoint(trained_checkpoint)
    future = _save({**state, "format_version": 99}, tmp_path / "future.pth")
    unknown_model = _save({**state, "model_name": "vgg99"}, tmp_path / "vgg.pth")
    plain_dict = _save({"weights": torch.zeros(3)}, tmp_path / "plain.pth")
    evil = _save({**state, "extra": _Payload()}, tmp_path / "evil.pth")
    cases = {
        text: "not a readable checkpoint",
        truncated: "not a readable checkpoint",
        future: "format version 99",
        unknown_model: "unknown model 'vgg99'",
        plain_dict: "not a cifar checkpoint",
        evil: "arbitrary objects",
        tmp_path / "missing.pth": "No checkpoint",
        tmp_path: "is a folder",
    }
    for path, message in cases.items():
        with pytest.raises(UsageError, match=message):
            load_checkpoint(path)
    assert not Path("pwned-by-checkpoint").exists()


def test_weights_that_do_not_fit_the_model(tmp_path: Path, trained_checkpoint: Path, prepared_dir: Path) -> None:
    from cifar_cli.config.sections import DataSettings

    state = load_checkpoint(trained_checkpoint)
    state["settings"]["model"]["width_multiplier"] = 0.5
    path = _save(state, tmp_path / "mismatch.pth")
    with pytest.raises(UsageError, match="do not fit"):
        run_evaluation(path, DataSettings(processed_dir=prepared_dir))


def _png_of_zeros(path: Path, width: int, height: int) -> Path:
    """A valid greyscale PNG of zeros, written row by row: 20,000 x 20,000 pixels take about 400 KB on disk."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_image_bomb_is_refused_from_its_header(tmp_path: Path, trained_checkpoint: Path) -> None:

    bomb = _png_of_zeros(tmp_path / "big.png", 20_000, 20_000)
    assert bomb.stat().st_size < 1_000_000
    result = run_cli("predict", str(trained_checkpoint), str(bomb), "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "decompression bomb" in " ".join(result.output.split())


def test_predict_reads_real_png_and_jpeg_files(tmp_path: Path, trained_checkpoint: Path) -> None:
    from PIL import Image

    from cifar_cli.data.images import load_image

    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    paths = []
    for name, mode in (("photo.jpg", "RGB"), ("scan.png", "L"), ("icon.png", "RGBA")):
        Image.fromarray(pixels).convert(mode).save(tmp_path / name)
        paths.append(tmp_path / name)
    assert load_image(paths[0]).shape == (3, 32, 32) and load_image(paths[1]).dtype == torch.uint8
    results = predict_images(trained_checkpoint, paths, top_k=2, device_name="cpu")
    assert [r["image"] for r in results] == [str(p) for p in paths]
    assert all(len(r["top"]) == 2 for r in results)


def test_selective_tta_augments_only_the_least_sure_images(trained_checkpoint: Path, prepared_dir: Path) -> None:
    """tta_share < 1: the share of images the plain pass is least sure of get the full TTA logits, the others keep
    the plain ones; the planner counts 1 + 6 x share passes; `cifar evaluate --tta-share` says so."""
    from cifar_cli.budget.plan import final_views
    from cifar_cli.data.loader import BatchLoader
    from cifar_cli.data.prepare import load_cache
    from cifar_cli.predict.inference import load_model, predict
    from cifar_cli.runtime.device import resolve_precision

    loaded, cache = load_model(trained_checkpoint, torch.device("cpu")), load_cache(prepared_dir)
    loader = BatchLoader(cache["test_images"], cache["test_labels"], 7, train=False, spec=loaded.spec)
    fp32 = resolve_precision("fp32", torch.device("cpu"))

    def logits(level: int, share: float = 1.0) -> torch.Tensor:
        return predict(loaded.model, loader, fp32, torch.device("cpu"), level, share).logits

    plain, full, selective = logits(0), logits(2), logits(2, 0.3)
    least_sure = plain.softmax(dim=1).amax(dim=1).argsort()[:9]  # ceil(0.3 x 30 test images)
    augmented = torch.zeros(len(plain), dtype=torch.bool)
    augmented[least_sure] = True
    assert torch.allclose(selective[augmented], full[augmented], atol=1e-5)
    assert torch.equal(selective[~augmented], plain[~augmented]) and not torch.allclose(plain, full)
    assert torch.equal(logits(2, 1.0), full)
    assert final_views(2, 0.25) == 2.5 and final_views(2, 1.0) == 6 and final_views(0, 0.25) == 1
    result = run_cli("evaluate", str(trained_checkpoint), "--tta-share", "0.3", "--json", "-")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["tta_share"] == 0.3
    # `--json -` with --predictions: the document alone on stdout (| jq), the note of the CSV on stderr
    result = run_cli("evaluate", str(trained_checkpoint), "--json", "-", "--predictions", "p.csv")
    assert result.exit_code == 0 and json.loads(result.stdout)["num_samples"] == 30, result.output
    assert "Predictions written to p.csv" in result.stderr
    assert run_cli("evaluate", str(trained_checkpoint), "--tta-share", "0").exit_code == 2

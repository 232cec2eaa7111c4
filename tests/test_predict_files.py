"""`cifar predict` on files and folders: batches, CSV and JSON files that agree with `cifar evaluate`, unreadable
files skipped and listed, Grad-CAM overlays (`--explain`)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from cifar_cli.config.sections import DataSettings
from cifar_cli.predict.evaluate import run_evaluation
from cifar_cli.train.run import train
from tests.conftest import flat, run_cli, tiny_settings


def invoke(*args: object):
    return run_cli(*args)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    return train(tiny_settings(folder, prepared_dir, "train.epochs=2", "train.tta=true")).checkpoint_dir / "last.pth"


def test_a_folder_in_batches_writes_csv_and_json_that_agree_with_evaluate(
    tmp_path: Path, checkpoint: Path, prepared_dir: Path
) -> None:
    """The 30 test PNGs (named by their index in the test split) in batches of 7, with a damaged image and a text
    file among them: every image's top class is the one `cifar evaluate` predicts for it."""
    images = tmp_path / "images"
    shutil.copytree(prepared_dir / "test", images)
    (images / "3_cat" / "damaged.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "notes.txt").write_text("not an image, not tried")
    result = invoke("predict", checkpoint, images, "--csv", tmp_path / "p.csv", "--json", tmp_path / "p.json",
                    "--batch-size", "7", "--top-k", "2", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Skipped 1 unreadable file" in result.output and "damaged.png" in result.output
    with open(tmp_path / "p.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 30 and list(rows[0]) == ["path", "class_1", "probability_1", "class_2", "probability_2"]
    result = invoke("evaluate", checkpoint, "--predictions", tmp_path / "e.csv", "--device", "cpu",
                    "--processed-dir", prepared_dir)  # fmt: skip
    assert result.exit_code == 0, result.output
    with open(tmp_path / "e.csv", newline="") as handle:
        evaluated = {int(row["index"]): row for row in csv.DictReader(handle)}
    evaluation = run_evaluation(checkpoint, DataSettings(processed_dir=prepared_dir), "test", device_name="cpu")
    assert len(evaluated) == 30 and [row["predicted"] for row in evaluated.values()] == [
        evaluation.metrics["class_names"][i] for i in evaluation.predicted.tolist()
    ]
    for row in rows:
        same_image = evaluated[int(Path(row["path"]).stem)]
        assert row["class_1"] == same_image["predicted"], row
        assert float(row["probability_1"]) == pytest.approx(float(same_image["probability"]), abs=1e-4)
        assert float(row["probability_1"]) >= float(row["probability_2"])
    document = json.loads((tmp_path / "p.json").read_text())
    assert [entry["image"] for entry in document["images"]] == [row["path"] for row in rows]
    assert [Path(entry["path"]).name for entry in document["skipped"]] == ["damaged.png"]
    # Printed (`--json -`), the same document: the skipped files too, on stdout, the messages apart on stderr.
    printed = invoke(
        "predict", checkpoint, images, "--json", "-", "--top-k", "2", "--batch-size", "7", "--device", "cpu"
    )
    assert json.loads(printed.stdout) == document


def test_explain_writes_one_overlay_per_image(tmp_path: Path, checkpoint: Path, prepared_dir: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        shutil.copy(next((prepared_dir / "test" / "0_plane").glob("*.png")), folder / "same.png")
    result = invoke("predict", checkpoint, first, second, "--explain", tmp_path / "why", "--device", "cpu")
    assert result.exit_code == 0, result.output
    written = sorted(path.name for path in (tmp_path / "why").iterdir())
    assert written == ["same-2.png", "same.png"]
    with Image.open(tmp_path / "why" / "same.png") as overlay:
        assert overlay.size[0] == 2 * 4 * 32  # the image and its heat map, side by side, 4x enlarged


def test_bad_inputs_are_clear_errors(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    (tmp_path / "empty" / "deeper" / "readme.txt").write_text("no images here")
    result = invoke("predict", checkpoint, tmp_path / "empty")
    assert result.exit_code == 2 and "holds no image files" in flat(result.output)
    result = invoke("predict", checkpoint, tmp_path / "nowhere")
    assert result.exit_code == 2 and "No such file or folder" in flat(result.output)
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    result = invoke("predict", checkpoint, tmp_path / "bad.jpg", "--csv", tmp_path / "out.csv")
    assert result.exit_code == 2 and "None of the 1 files could be read" in flat(result.output)
    assert not (tmp_path / "out.csv").exists()


def test_ties_go_to_the_lower_class_as_evaluate_decides_them() -> None:
    """bf16 logits tie exactly now and then; predict's top class must be argmax's (the lower index), as evaluate's."""
    from cifar_cli.predict.classify import top_classes

    probabilities = torch.tensor([[0.1, 0.3, 0.3, 0.3], [0.4, 0.0, 0.2, 0.4]])
    rows = top_classes([Path("a.png"), Path("b.png")], probabilities, ["w", "x", "y", "z"], 3)
    assert [[t["class"] for t in row["top"]] for row in rows] == [["x", "y", "z"], ["w", "z", "y"]]
    assert [row["top"][0]["class"] for row in rows] == [["w", "x", "y", "z"][i] for i in probabilities.argmax(1)]

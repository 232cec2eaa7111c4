"""CIFAR-100 and image folders: preparation, bad input, and everything downstream following the data's classes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_cli.data.prepare import load_cache, prepare_dataset, prepare_folder, read_manifest
from cifar_cli.data.spec import CIFAR10_SPEC, DataSpec, channel_statistics
from cifar_cli.errors import UsageError
from tests.conftest import COARSE_NAMES, FINE_NAMES, build_cifar100_archive, flat, run_cli, write_image_tree


def invoke(*args: str):
    return run_cli(*args)


@pytest.fixture(scope="module")
def cifar100_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cifar100_archive(tmp_path_factory.mktemp("c100") / "cifar-100-python.tar.gz")


def _raw_with(archive: Path, tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    (raw / archive.name).write_bytes(archive.read_bytes())
    return raw


# ------------------------------------------------------------------------------------------------ CIFAR-100


@pytest.mark.parametrize(("label_set", "names"), [("fine", FINE_NAMES), ("coarse", COARSE_NAMES)])
def test_cifar100_fine_and_coarse_labels(tmp_path: Path, cifar100_archive: Path, label_set: str, names) -> None:
    raw = _raw_with(cifar100_archive, tmp_path)
    result = prepare_dataset(raw, tmp_path / "out", dataset="cifar100", label_set=label_set)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["class_names"] == names and manifest["dataset"] == "cifar100"
    assert manifest["label_set"] == label_set and result.counts == {"train": 400, "test": 200}
    cache = load_cache(tmp_path / "out")
    assert int(cache["train_labels"].max()) == len(names) - 1
    # Folders sort in label order and hold each class's images.
    folders = sorted(path.name for path in (tmp_path / "out" / "train").iterdir())
    assert folders[0] == f"00_{names[0]}" and len(folders) == len(names)
    assert manifest["per_class"]["test"][folders[-1]] == int((cache["test_labels"] == len(names) - 1).sum())


def test_cifar100_statistics_come_from_the_training_images(tmp_path: Path, cifar100_archive: Path) -> None:
    prepare_dataset(_raw_with(cifar100_archive, tmp_path), tmp_path / "out", write_png=False, dataset="cifar100")
    manifest = read_manifest(tmp_path / "out")
    pixels = load_cache(tmp_path / "out")["train_images"].numpy().astype(np.float64) / 255
    assert manifest["mean"] == pytest.approx(pixels.mean(axis=(0, 2, 3)).tolist(), abs=1e-5)
    assert manifest["std"] == pytest.approx(pixels.std(axis=(0, 2, 3)).tolist(), abs=1e-5)
    assert manifest["mean"] != pytest.approx(list(CIFAR10_SPEC.mean), abs=1e-3)


def test_a_cifar100_archive_named_as_cifar10_is_refused(tmp_path: Path, cifar100_archive: Path) -> None:
    raw = _raw_with(cifar100_archive, tmp_path)
    (raw / "cifar-100-python.tar.gz").rename(raw / "cifar-10-python.tar.gz")  # a CIFAR-100 file under the -10 name
    with pytest.raises(UsageError, match="batches.meta|data_batch_1"):
        prepare_dataset(raw, tmp_path / "out")


def test_cifar100_five_commands_end_to_end(tmp_path: Path, cifar100_archive: Path) -> None:
    """download (a mirror, the MD5 given), prepare, train, evaluate, predict and plot on the CIFAR-100 layout."""
    md5 = hashlib.md5(cifar100_archive.read_bytes()).hexdigest()
    data = ["--raw-dir", tmp_path / "raw", "--processed-dir", tmp_path / "c100"]
    result = invoke("download", "--dataset", "cifar100", "--url", cifar100_archive.as_uri(), "--md5", md5, data[0],
                    data[1])  # fmt: skip
    assert result.exit_code == 0 and (tmp_path / "raw" / "cifar-100-python.tar.gz").is_file(), result.output
    result = invoke("prepare", "--dataset", "cifar100", *data)
    assert result.exit_code == 0 and "100 classes" in result.output, result.output
    paths = ["--processed-dir", tmp_path / "c100", "--checkpoint-dir", tmp_path / "ck", "--log-dir",
             tmp_path / "runs"]  # fmt: skip
    result = invoke("train", "--preset", "fast", "--epochs", "1", "--batch-size", "100", "--device", "cpu",
                    "--precision", "fp32", "--set", "model.width_multiplier=0.25", "--run-name", "c100",
                    "--progress", "plain", *paths)  # fmt: skip
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "ck" / "c100" / "last.pth", map_location="cpu", weights_only=False)
    assert state["class_names"] == FINE_NAMES
    assert state["data_spec"]["mean"] == read_manifest(tmp_path / "c100")["mean"]
    assert state["model_state"]["head.weight"].shape[0] == 100

    result = invoke("evaluate", tmp_path / "ck" / "c100" / "last.pth", "--device", "cpu", "--json",
                    tmp_path / "m.json", "--processed-dir", tmp_path / "c100")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Most confused pairs" in result.output and "lowest F1" in result.output
    assert "Confusion matrix" not in result.output  # no 100 x 100 table on the console
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert len(metrics["confusion_matrix"]) == 100 and metrics["num_samples"] == 200

    image = tmp_path / "one.png"
    Image.fromarray(np.full((32, 32, 3), 120, dtype=np.uint8)).save(image)
    result = invoke("predict", tmp_path / "ck" / "c100" / "last.pth", image, "--json", "-", "--device", "cpu")
    assert result.exit_code == 0, result.output
    top = json.loads(result.output)["images"][0]["top"]
    assert {entry["class"] for entry in top} <= set(FINE_NAMES) and len(top) == 3

    result = invoke("plot", tmp_path / "runs" / "c100", "--out", tmp_path / "plots")
    assert result.exit_code == 0 and (tmp_path / "plots" / "confusion_matrix.png").is_file(), result.output


def test_asking_for_another_dataset_than_prepared_is_refused(tmp_path: Path, prepared_dir: Path) -> None:
    result = invoke("train", "--dataset", "cifar100", "--processed-dir", prepared_dir, "--dry-run")
    assert result.exit_code == 2 and "holds cifar10 data" in result.output, result.output


# ------------------------------------------------------------------------------------------------ folders


def test_folder_single_tree_any_size_and_mode(tmp_path: Path) -> None:
    source = write_image_tree(tmp_path / "imgs", {"cat": 10, "dog": 10, "Fish": 5}, size=(50, 20))
    Image.new("L", (17, 23), 128).save(source / "cat" / "grey.png")  # grey, odd size
    Image.new("RGBA", (64, 64), (10, 200, 30, 100)).save(source / "dog" / "alpha.webp")
    Image.new("P", (8, 8)).save(source / "dog" / "palette.bmp")
    Image.new("RGB", (33, 33), (1, 2, 3)).save(source / "dog" / "photo.JPEG")
    (source / "dog" / "notes.txt").write_text("not an image")
    (source / "dog" / ".DS_Store").write_bytes(b"\0")
    (source / "README.md").write_text("beside the classes")
    (source / "empty").mkdir()
    (source / "dog" / "nested").mkdir()
    Image.new("RGB", (32, 32)).save(source / "dog" / "nested" / "deep.png")

    result = prepare_folder(source, tmp_path / "out", image_size=24, test_fraction=0.2)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["class_names"] == ["Fish", "cat", "dog"]  # sorted, as ImageFolder
    assert manifest["counts"] == {"train": 24, "test": 6}  # Fish 5, cat 11, dog 14: 1, 2 and 3 held out
    assert manifest["per_class"]["test"] == {"0_Fish": 1, "1_cat": 2, "2_dog": 3}
    assert manifest["ignored_files"] == 3 and manifest["empty_classes"] == ["empty"]
    assert any("empty" in note for note in result.notes) and any("Ignored 3" in note for note in result.notes)
    cache = load_cache(tmp_path / "out")
    assert cache["train_images"].shape[1:] == (3, 24, 24) and cache["train_images"].dtype == torch.uint8
    assert manifest["image_size"] == 24 and DataSpec.from_dict(manifest).num_classes == 3
    mean, std = channel_statistics(cache["train_images"])
    assert manifest["mean"] == pytest.approx(list(mean)) and manifest["std"] == pytest.approx(list(std))


def test_folder_split_is_stratified_seeded_and_repeatable(tmp_path: Path) -> None:
    source = write_image_tree(tmp_path / "imgs", {"a": 20, "b": 10})
    prepare_folder(source, tmp_path / "one", write_png=False, test_fraction=0.3)
    prepare_folder(source, tmp_path / "two", write_png=False, test_fraction=0.3)
    one, two = load_cache(tmp_path / "one"), load_cache(tmp_path / "two")
    assert torch.equal(one["test_images"], two["test_images"])
    assert torch.bincount(one["test_labels"]).tolist() == [6, 3]
    again = prepare_folder(source, tmp_path / "one", write_png=False, test_fraction=0.3)
    assert again.already_prepared
    assert not prepare_folder(source, tmp_path / "one", write_png=False, test_fraction=0.5).already_prepared


def test_folder_train_and_test_trees(tmp_path: Path) -> None:
    write_image_tree(tmp_path / "imgs" / "train", {"x": 6, "y": 6})
    write_image_tree(tmp_path / "imgs" / "test", {"x": 2, "y": 3}, seed=1)
    prepare_folder(tmp_path / "imgs", tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    assert manifest["layout"] == "split" and manifest["counts"] == {"train": 12, "test": 5}
    assert len(list((tmp_path / "out" / "test" / "1_y").iterdir())) == 3
    assert sum(1 for _ in (tmp_path / "out" / "test").rglob("*.png")) == 5


def test_folder_pixels_survive_unchanged_at_32(tmp_path: Path) -> None:
    """A 32 x 32 PNG is not resampled: the cache holds exactly its pixels."""
    source = write_image_tree(tmp_path / "imgs", {"a": 3, "b": 3}, size=(32, 32))
    prepare_folder(source, tmp_path / "out", write_png=False, test_fraction=0.34)
    cache = load_cache(tmp_path / "out")
    originals = {np.asarray(Image.open(path)).tobytes() for path in sorted(source.rglob("*.png"))}
    cached = {image.permute(1, 2, 0).numpy().tobytes() for image in cache["train_images"]}
    assert cached <= originals and len(cached) == 4


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated", "Cannot read image .*b/001.jpg"),
        ("garbage", "Cannot read image .*b/001.jpg"),
        ("one_class", "at least two classes"),
        ("no_classes", "at least two classes"),
        ("escape", "symbolic link to .*outside"),
        ("collide", "'Big Cat' and 'big_cat'"),
        ("unknown_test_class", "class folders that .* lacks: z"),
    ],
)
def test_folder_bad_input_is_refused_and_nothing_is_written(tmp_path: Path, damage: str, message: str) -> None:
    source = write_image_tree(tmp_path / "imgs", {"a": 4, "b": 4}, suffix=".jpg")
    bad = source / "b" / "001.jpg"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:200])
    elif damage == "garbage":
        bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    elif damage == "one_class":
        for path in (source / "b").iterdir():
            path.unlink()
    elif damage == "no_classes":
        for path in source.rglob("*.jpg"):
            path.unlink()
    elif damage == "escape":
        outside = write_image_tree(tmp_path / "elsewhere", {"c": 1})
        os.symlink(outside / "c" / "000.jpg", source / "a" / "linked.jpg")
    elif damage == "collide":
        write_image_tree(source, {"Big Cat": 1, "big_cat": 1})
    elif damage == "unknown_test_class":
        source.rename(tmp_path / "train")
        (tmp_path / "imgs").mkdir()
        (tmp_path / "train").rename(source / "train")
        write_image_tree(source / "test", {"a": 1, "z": 1})
    out = tmp_path / "out"
    out.mkdir()
    (out / ".keep").write_text("user file")  # hidden: not in prepare's way
    with pytest.raises(UsageError, match=message):
        prepare_folder(source, out)
    assert sorted(p.name for p in out.iterdir()) == [".keep"]  # no cache, manifest, PNG or temporary files


def test_symlink_inside_the_folder_is_followed(tmp_path: Path) -> None:
    source = write_image_tree(tmp_path / "imgs", {"a": 3, "b": 3})
    os.symlink(source / "a" / "000.png", source / "b" / "also.png")
    prepare_folder(source, tmp_path / "out", write_png=False)
    assert sum(read_manifest(tmp_path / "out")["counts"].values()) == 7


def test_skip_bad_images_counts_and_names_them(tmp_path: Path) -> None:
    source = write_image_tree(tmp_path / "imgs", {"a": 5, "b": 5}, suffix=".jpg")
    (source / "a" / "002.jpg").write_bytes(b"broken")
    result = prepare_folder(source, tmp_path / "out", write_png=False, skip_bad_images=True)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["skipped_images"] == [str(Path("a") / "002.jpg")]
    assert sum(manifest["counts"].values()) == 9
    assert any("Skipped 1 unreadable" in note for note in result.notes)


def test_folder_cli_train_evaluate_predict(tmp_path: Path) -> None:
    """The commands on a folder tree: prepare --from-folder, train (airbench at 48 x 48), evaluate, predict with
    the folder's class names, and the refusals that protect them."""
    source = write_image_tree(tmp_path / "imgs", {"apple": 30, "pear": 30, "plum": 30}, (60, 60), ".jpg")
    processed = tmp_path / "processed"
    result = invoke("prepare", "--from-folder", source, "--processed-dir", processed, "--image-size", "48",
                    "--test-fraction", "0.2")  # fmt: skip
    assert result.exit_code == 0 and "72 train, 18 test images, 3 classes, 48 x 48" in result.output, result.output
    paths = ["--processed-dir", processed, "--checkpoint-dir", tmp_path / "ck", "--log-dir", tmp_path / "runs"]
    result = invoke("train", "--model", "seed-cnn", "--epochs", "1", "--device", "cpu", *paths)
    assert result.exit_code == 2 and "takes 32 x 32 images" in result.output, result.output
    # The head's lr is lowered from the preset's 1.66: three steps per epoch on 72 images diverge at full lr.
    result = invoke("train", "--preset", "fast", "--epochs", "3", "--lr", "0.2", "--batch-size", "24", "--device",
                    "cpu", "--precision", "fp32", "--set", "model.width_multiplier=0.25", "--run-name", "fruit",
                    "--progress", "plain", *paths)  # fmt: skip
    assert result.exit_code == 0, result.output
    checkpoint = tmp_path / "ck" / "fruit" / "last.pth"
    result = invoke("evaluate", checkpoint, "--device", "cpu", "--processed-dir", processed)
    assert result.exit_code == 0 and "Confusion matrix" in result.output, result.output
    assert "accuracy 100.00%" in flat(result.output) and "plum" in result.output  # colours that tell the class

    plum = tmp_path / "plum.jpg"
    Image.open(source / "plum" / "000.jpg").save(plum)
    result = invoke("predict", checkpoint, plum, "--json", "-", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["images"][0]["top"][0]["class"] == "plum"

    # An export carries the folder's classes, size and statistics, and predicts with them.
    exported = tmp_path / "fruit.pt2"
    result = invoke("export", checkpoint, "--format", "pt2", "--out", exported, "--processed-dir", processed)
    assert result.exit_code == 0, result.output
    from cifar_cli.predict.exported_model import load_exported

    contract = load_exported(exported).contract
    manifest = read_manifest(processed)
    assert contract["input"]["shape"][1:] == [3, 48, 48] and contract["class_names"] == ["apple", "pear", "plum"]
    assert contract["normalisation"] == {"mean": manifest["mean"], "std": manifest["std"]}
    result = invoke("predict", exported, plum, "--json", "-")
    assert result.exit_code == 0 and json.loads(result.output)["images"][0]["top"][0]["class"] == "plum", result.output

    other = write_image_tree(tmp_path / "other", {"apple": 4, "kiwi": 4}, size=(48, 48))
    prepare_folder(other, tmp_path / "other_processed", image_size=48)
    result = invoke("evaluate", checkpoint, "--device", "cpu", "--processed-dir", tmp_path / "other_processed")
    assert result.exit_code == 2 and "trained on 3 classes" in result.output, result.output


def test_runs_on_different_data_get_different_names(tmp_path: Path, prepared_dir: Path) -> None:
    from cifar_cli.config.settings import load_settings, parse_set_options
    from cifar_cli.data import adopt_prepared
    from cifar_cli.train.identity import default_run_name, recipe_identity

    def name(*assignments: str) -> str:
        settings = load_settings(None, parse_set_options(list(assignments)))
        return default_run_name(settings.model_copy(update={"data": adopt_prepared(settings.data)}))

    source_one = write_image_tree(tmp_path / "one", {"a": 3, "b": 3})
    source_two = write_image_tree(tmp_path / "two", {"a": 3, "b": 3}, seed=5)
    prepare_folder(source_one, tmp_path / "p1", write_png=False)
    prepare_folder(source_two, tmp_path / "p2", write_png=False)
    names = {name(f"data.processed_dir={where}") for where in (prepared_dir, tmp_path / "p1", tmp_path / "p2")}
    assert len(names) == 3
    # CIFAR-10 runs keep the identity they had before data sets existed: the official checksum and the split.
    settings = load_settings(None, parse_set_options([f"data.processed_dir={prepared_dir}"]))
    identity = recipe_identity(settings.model_copy(update={"data": adopt_prepared(settings.data)}).to_plain())
    assert {key: value for key, value in identity.items() if key.startswith("data.")} == {
        "data.md5": "c58f30108f718f92721af3b95e74349a",
        "data.val_size": "auto",
    }


def test_normalisation_uses_the_data_statistics() -> None:
    from cifar_cli.data.loader import normalize

    images = torch.randint(0, 100, (64, 3, 8, 8), dtype=torch.uint8)
    mean, std = channel_statistics(images)
    spec = DataSpec(("a", "b"), mean, std)
    normalised = normalize(images, torch.float32, False, spec)
    assert normalised.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (normalised.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-3


def test_most_confused_pairs_and_a_readable_100_class_figure() -> None:
    from cifar_cli.predict.metrics import most_confused
    from cifar_cli.ui.plots import confusion_matrix_figure

    matrix = np.eye(100, dtype=int) * 5
    matrix[3, 7], matrix[9, 1], matrix[50, 51] = 4, 9, 4
    pairs = most_confused(matrix.tolist(), FINE_NAMES, 3)
    assert pairs == [("fine09", "fine01", 9), ("fine03", "fine07", 4), ("fine50", "fine51", 4)]
    figure = confusion_matrix_figure(matrix.tolist(), FINE_NAMES)
    axis = figure.axes[0]
    assert not axis.texts  # no 10,000 numbers on top of each other
    assert len(axis.get_xticklabels()) == 100 and figure.get_size_inches()[1] > 15


def test_a_cache_without_its_manifest_is_prepared_again(tmp_path: Path) -> None:
    """The manifest is written last: a cache beside a manifest under way is an unfinished preparation, never data
    of unknown classes."""
    from cifar_cli.config.sections import DataSettings
    from cifar_cli.data import ensure_prepared

    source = write_image_tree(tmp_path / "imgs", {"a": 3, "b": 3, "c": 3})
    prepare_folder(source, tmp_path / "out", write_png=False)
    under_way = {"incomplete": True, "written": ["cache.pt", "manifest.json"], "class_folders": []}
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(under_way))
    data = DataSettings(dataset="folder", folder=source, processed_dir=tmp_path / "out", write_png=False)
    ensure_prepared(data)
    assert read_manifest(tmp_path / "out")["class_names"] == ["a", "b", "c"]

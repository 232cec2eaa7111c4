"""`cifar prepare --from-csv`: a CSV list of labelled images, its refusals (named by row), and the commands after it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cifar_cli.data.csv_list import scan_csv
from cifar_cli.data.prepare import load_cache, read_manifest
from cifar_cli.errors import UsageError
from tests.conftest import flat, run_cli, write_image_tree

CLASSES = {"apple": 250, "pear": 250, "plum": 250, "fig": 250}  # 1,000 images


def _csv(path: Path, rows: list[tuple[str, ...]], header: str = "path,label") -> Path:
    path.write_text("\n".join([header, *(",".join(row) for row in rows)]) + "\n")
    return path


def _listed(tree: Path) -> list[tuple[str, str]]:
    """(path relative to the tree, label) of every image, sorted: the rows a CSV beside the tree would have."""
    return sorted((str(p.relative_to(tree)), p.parent.name) for p in tree.rglob("*.png"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_tree(tmp_path_factory.mktemp("csv") / "images", CLASSES, (32, 32))


def test_a_thousand_rows_with_bad_ones_are_refused_by_row_then_prepare_train_and_evaluate(
    tree: Path, tmp_path: Path
) -> None:
    rows = _listed(tree)
    assert len(rows) == 1_000
    bad = list(rows)
    for index in (10, 500, 900):  # rows 12, 502, 902 of the file (the header is row 1)
        bad[index] = (f"gone/{index}.png", bad[index][1])
    bad[42] = (bad[42][0], "")  # row 44
    csv_file = _csv(tree / "labels.csv", bad)
    processed = tmp_path / "processed"
    result = run_cli("prepare", "--from-csv", str(csv_file), "--processed-dir", str(processed))
    assert result.exit_code == 2, result.output
    assert "1 row of" in flat(result.output) and "has an empty label" in flat(result.output)
    assert "row 44:" in result.output and not processed.exists()
    bad[42] = rows[42]
    _csv(csv_file, bad)
    result = run_cli("prepare", "--from-csv", str(csv_file), "--processed-dir", str(processed))
    assert result.exit_code == 2 and "3 rows of" in flat(result.output), result.output
    assert all(f"row {number}:" in result.output for number in (12, 502, 902)), result.output
    assert "gone/500.png" in flat(result.output)
    # Skipped on request, counted; fixed, prepared in full.
    result = run_cli("prepare", "--from-csv", str(csv_file), "--processed-dir", str(processed), "--skip-bad-images")
    assert result.exit_code == 0 and "Skipped 3 rows" in flat(result.output), result.output
    assert sum(read_manifest(processed)["counts"].values()) == 997
    _csv(csv_file, rows)
    result = run_cli("prepare", "--from-csv", str(csv_file), "--processed-dir", str(processed))
    assert result.exit_code == 0 and "800 train, 200 test images, 4 classes" in flat(result.output), result.output
    assert read_manifest(processed)["class_names"] == ["apple", "fig", "pear", "plum"]

    paths = ["--processed-dir", str(processed), "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir",
             str(tmp_path / "runs")]  # fmt: skip
    result = run_cli("train", "--preset", "baseline", "--epochs", "2", "--batch-size", "50", "--device", "cpu",
                     "--run-name", "fruit", "--progress", "none", *paths)  # fmt: skip
    assert result.exit_code == 0, result.output
    result = run_cli("evaluate", str(tmp_path / "ck" / "fruit" / "last.pth"), "--device", "cpu", "--json", "-",
                     "--processed-dir", str(processed))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["accuracy"] > 0.9  # each class is a colour: chance is 0.25


def test_paths_from_root_absolute_paths_and_a_split_column(tree: Path, tmp_path: Path) -> None:
    rows = _listed(tree)[::25]  # 40 rows, 10 per class
    listed = [(path, label, "test" if index % 5 == 0 else "train") for index, (path, label) in enumerate(rows)]
    listed[1] = (str(tree / listed[1][0]), listed[1][1], listed[1][2])  # one absolute path
    csv_file = _csv(tmp_path / "list.csv", listed, "Path,Label,Split")  # column names in any case
    with pytest.raises(UsageError, match="do not exist"):
        scan_csv(csv_file, 0.2)  # relative to the CSV's own folder, where the images are not
    scan = scan_csv(csv_file, 0.2, root=tree)
    assert scan.layout == "csv-split" and scan.class_names == ["apple", "fig", "pear", "plum"]
    assert len(scan.files["test"]) == 8 and len(scan.files["train"]) == 32
    processed = tmp_path / "processed"
    result = run_cli("prepare", "--from-csv", str(csv_file), "--root", str(tree), "--processed-dir", str(processed),
                     "--no-png")  # fmt: skip
    assert result.exit_code == 0, result.output
    cache = load_cache(processed)
    assert len(cache["test_labels"]) == 8 and cache["train_images"].shape[1:] == (3, 32, 32)


@pytest.mark.parametrize(
    "header, rows, message",
    [
        ("file,class", [("a.png", "x")], "lacks the columns path, label"),
        ("path,label,split", [("apple/000.png", "apple", "val"), ("pear/000.png", "pear", "train")],
         "split other than train or test"),
        ("path,label", [("apple/000.png", "apple"), ("apple/000.png", "apple"), ("pear/000.png", "pear")],
         "an earlier row lists"),
        ("path,label,split", [("apple/000.png", "apple", "train"), ("pear/000.png", "pear", "test")],
         "no training row has"),
        ("path,label", [("apple/000.png", "apple"), ("apple/001.png", "apple")], "at least two labels"),
        ("path,label", [], "lists no images"),
    ],
)  # fmt: skip
def test_lists_that_cannot_be_trained_on_are_refused(
    tree: Path, tmp_path: Path, header: str, rows: list[tuple[str, ...]], message: str
) -> None:
    csv_file = _csv(tmp_path / "list.csv", rows, header)
    result = run_cli("prepare", "--from-csv", str(csv_file), "--root", str(tree), "--processed-dir",
                     str(tmp_path / "p"))  # fmt: skip
    assert result.exit_code == 2 and message in flat(result.output), result.output


def test_an_unreadable_listed_file_is_named_or_skipped(tree: Path, tmp_path: Path) -> None:
    rows = _listed(tree)[::50]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    csv_file = _csv(tmp_path / "list.csv", [*[(str(tree / p), label) for p, label in rows], ("broken.png", "apple")])
    processed = tmp_path / "processed"
    result = run_cli("prepare", "--from-csv", str(csv_file), "--processed-dir", str(processed))
    assert result.exit_code == 2 and "broken.png" in flat(result.output), result.output
    result = run_cli("prepare", "--from-csv", str(csv_file), "--processed-dir", str(processed), "--skip-bad-images")
    assert result.exit_code == 0 and "broken.png" in flat(result.output), result.output
    assert sum(read_manifest(processed)["counts"].values()) == len(rows)


def test_a_split_column_with_an_empty_or_missing_cell_is_refused_by_row(tree: Path, tmp_path: Path) -> None:
    """A short first row once made the whole column ignored; a later short row landed in neither split."""
    rows = [",".join(row) for row in _listed(tree)[::100]]  # 10 rows: apple, fig, pear, plum
    lines = [rows[0], *(f"{row},{'test' if i % 3 == 0 else 'train'}" for i, row in enumerate(rows[1:]))]
    lines[5] = rows[5] + ","  # an empty cell
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("\n".join(["path,label,split", *lines]) + "\n")
    with pytest.raises(UsageError, match="2 rows .* leave the split empty") as refused:
        scan_csv(csv_file, 0.2, root=tree)
    assert "row 2:" in str(refused.value) and "row 7:" in str(refused.value)


def test_a_label_renamed_in_the_list_is_prepared_again(tree: Path, tmp_path: Path) -> None:
    rows = _listed(tree)[::50]
    csv_file = _csv(tmp_path / "list.csv", [(str(tree / p), label) for p, label in rows])
    processed = tmp_path / "processed"
    assert run_cli("prepare", "--from-csv", csv_file, "--processed-dir", processed, "--no-png").exit_code == 0
    _csv(csv_file, [(str(tree / p), "peach" if label == "pear" else label) for p, label in rows])
    result = run_cli("prepare", "--from-csv", csv_file, "--processed-dir", processed, "--no-png")
    assert result.exit_code == 0 and "Already prepared" not in flat(result.output), result.output
    assert read_manifest(processed)["class_names"] == ["apple", "fig", "peach", "plum"]

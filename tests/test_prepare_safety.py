"""`cifar prepare` never deletes or replaces a file it did not write: a user's images in the source folder, the
output folder or beside a CSV list survive byte for byte, whatever folders are passed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cifar_cli.data.prepare import read_manifest
from tests.conftest import build_archive, flat, run_cli, write_image_tree

CLASSES = {"cat": 6, "dog": 6}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below `folder` (and the folder's own files) with its MD5."""
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def photos_with_splits(root: Path) -> Path:
    write_image_tree(root / "train", CLASSES, suffix=".jpg")
    write_image_tree(root / "test", {"cat": 2, "dog": 2}, suffix=".jpg", seed=1)
    return root


def csv_beside(root: Path) -> Path:
    write_image_tree(root, CLASSES, suffix=".jpg")
    rows = [f"{p.relative_to(root)},{p.parent.name}" for p in sorted(root.rglob("*.jpg"))]
    csv_file = root / "labels.csv"
    csv_file.write_text("\n".join(["path,label", *rows]) + "\n")
    return csv_file


def refused(result, *phrases: str) -> None:
    assert result.exit_code == 2, result.output
    assert all(phrase in flat(result.output) for phrase in phrases), result.output


def test_the_output_folder_holding_the_source_is_refused_and_nothing_is_touched(tmp_path: Path) -> None:
    photos = photos_with_splits(tmp_path / "photos")
    before = snapshot(photos)
    refused(run_cli("prepare", "--from-folder", photos / "train", "--processed-dir", photos), "holds the source folder")
    refused(run_cli("prepare", "--from-folder", photos, "--processed-dir", photos), "inside the source folder")
    refused(run_cli("prepare", "--from-folder", photos, "--processed-dir", photos / "out"), "inside the source")
    assert snapshot(photos) == before


def test_an_output_folder_beside_a_csv_or_holding_its_images_is_refused(tmp_path: Path) -> None:
    csv_file = csv_beside(tmp_path / "photos")
    before = snapshot(tmp_path / "photos")
    refused(run_cli("prepare", "--from-csv", csv_file, "--processed-dir", tmp_path / "photos"), "holds the source")
    refused(run_cli("prepare", "--from-csv", csv_file, "--processed-dir", tmp_path / "photos" / "cat"), "holds images")
    assert snapshot(tmp_path / "photos") == before
    # Beside the CSV's folder, not in it: prepared, and the user's files are as they were.
    result = run_cli("prepare", "--from-csv", csv_file, "--processed-dir", tmp_path / "prepared")
    assert result.exit_code == 0, result.output
    assert snapshot(tmp_path / "photos") == before


def test_a_users_file_in_the_output_folder_is_named_and_kept(tmp_path: Path) -> None:
    data = write_image_tree(tmp_path / "data", CLASSES)
    mine = tmp_path / "mine"
    (mine / "train" / "holiday").mkdir(parents=True)
    (mine / "train" / "holiday" / "a.jpg").write_bytes(b"a photo of mine")
    (mine / "notes.txt").write_text("mine too")
    before = snapshot(mine)
    refused(run_cli("prepare", "--from-folder", data, "--processed-dir", mine), "did not write", "notes.txt")
    assert snapshot(mine) == before
    (mine / "notes.txt").unlink()
    refused(run_cli("prepare", "--from-folder", data, "--processed-dir", mine), "holiday")
    assert (mine / "train" / "holiday" / "a.jpg").read_bytes() == b"a photo of mine"


def test_a_file_added_to_a_prepared_folder_stops_the_next_preparation(tmp_path: Path) -> None:
    """A prepared folder is prepare's own, but a file added inside its PNG folders is not."""
    data = write_image_tree(tmp_path / "data", CLASSES)
    out = tmp_path / "out"
    assert run_cli("prepare", "--from-folder", data, "--processed-dir", out).exit_code == 0
    added = out / "train" / "0_cat" / "my-favourite.jpg"
    added.write_bytes(b"keep me")
    write_image_tree(tmp_path / "data", {"bird": 6})  # new data: the folder would be prepared again
    refused(run_cli("prepare", "--from-folder", data, "--processed-dir", out), "my-favourite.jpg")
    assert added.read_bytes() == b"keep me"
    added.unlink()
    result = run_cli("prepare", "--from-folder", data, "--processed-dir", out)
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["class_names"] == ["bird", "cat", "dog"]
    assert sorted(p.name for p in (out / "train").iterdir()) == ["0_bird", "1_cat", "2_dog"]


def test_a_preparation_stopped_half_way_still_owns_what_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest under way names what prepare is writing, and counts as no prepared data."""
    from cifar_cli.data import prepare

    data = write_image_tree(tmp_path / "data", CLASSES)
    out = tmp_path / "out"
    assert run_cli("prepare", "--from-folder", data, "--processed-dir", out).exit_code == 0
    write_image_tree(tmp_path / "data", {"cat": 8})  # new data: prepared again

    def stopped(*_args: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C after the cache, before the PNG folders

    with monkeypatch.context() as patch:
        patch.setattr(prepare, "_write_png_folder", stopped)
        with pytest.raises(KeyboardInterrupt):
            prepare.prepare_folder(data, out)
    assert json.loads((out / "manifest.json").read_text())["incomplete"] is True
    assert read_manifest(out) is None
    result = run_cli("prepare", "--from-folder", data, "--processed-dir", out)
    assert result.exit_code == 0 and "Prepared" in flat(result.output), result.output
    assert sum(read_manifest(out)["counts"].values()) == 14


def test_an_archive_in_the_output_folder_is_the_users_own_source(tmp_path: Path) -> None:
    """--raw-dir equal to --processed-dir: the archive and its extracted folder are not in the way."""
    same = tmp_path / "same"
    same.mkdir()
    build_archive(same / "cifar-10-python.tar.gz")
    archive_md5 = hashlib.md5((same / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    for _ in range(2):
        result = run_cli("prepare", "--raw-dir", same, "--processed-dir", same)
        assert result.exit_code == 0, result.output
    assert hashlib.md5((same / "cifar-10-python.tar.gz").read_bytes()).hexdigest() == archive_md5


def test_no_png_removes_only_the_png_folders_it_wrote(tmp_path: Path) -> None:
    data = write_image_tree(tmp_path / "data", CLASSES)
    out = tmp_path / "out"
    assert run_cli("prepare", "--from-folder", data, "--processed-dir", out).exit_code == 0
    write_image_tree(tmp_path / "data", {"cat": 7})  # changed data
    result = run_cli("prepare", "--from-folder", data, "--processed-dir", out, "--no-png")
    assert result.exit_code == 0, result.output
    assert not (out / "train").exists() and (out / "cache.pt").is_file()
    assert read_manifest(out)["written"] == ["cache.pt", "manifest.json"]


@pytest.mark.parametrize("named", ["yaml", "env"])
def test_a_folder_on_the_command_line_wins_over_a_csv_list_in_the_settings(tmp_path: Path, named: str) -> None:
    csv_file = csv_beside(tmp_path / "listed")
    data = write_image_tree(tmp_path / "data", {"ant": 5, "bee": 5, "fly": 5})
    env = {}
    if named == "yaml":
        (tmp_path / "settings.yaml").write_text(f"data:\n  csv_file: {csv_file}\n")
    else:
        env["CIFAR_DATA__CSV_FILE"] = str(csv_file)
    result = run_cli("prepare", "--from-folder", data, "--processed-dir", tmp_path / "out", env=env)
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "out")["class_names"] == ["ant", "bee", "fly"]

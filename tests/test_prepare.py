from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_cli.data import archive
from cifar_cli.data.prepare import CLASS_NAMES, class_folders, load_cache, prepare_dataset
from cifar_cli.errors import CifarError, UsageError
from tests.conftest import batch_bytes, build_archive, make_images, py2_pickle

CLASS_FOLDERS = class_folders(CLASS_NAMES)


def raw_folder(tmp_path: Path, **archive_options) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    build_archive(raw / "cifar-10-python.tar.gz", **archive_options)
    return raw


def test_counts_folders_and_manifest(prepared_dir: Path) -> None:
    manifest = json.loads((prepared_dir / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 100, "test": 30}
    assert sorted(p.name for p in (prepared_dir / "train").iterdir()) == CLASS_FOLDERS
    assert sum(1 for _ in (prepared_dir / "train").rglob("*.png")) == 100
    assert sum(1 for _ in (prepared_dir / "test").rglob("*.png")) == 30
    assert sum(manifest["per_class"]["test"].values()) == 30


def test_png_pixels_equal_the_archive_pixels(prepared_dir: Path) -> None:
    data, labels = make_images(30, seed=99)  # the test batch of the tiny archive
    for index in (0, 7, 29):
        png = prepared_dir / "test" / CLASS_FOLDERS[labels[index]] / f"{index:05d}.png"
        pixels = np.asarray(Image.open(png)).transpose(2, 0, 1)
        assert np.array_equal(pixels, data[index].reshape(3, 32, 32))


def test_cache_round_trip(prepared_dir: Path) -> None:
    cache = load_cache(prepared_dir)
    data, labels = make_images(30, seed=99)
    assert cache["test_images"].dtype == torch.uint8 and cache["test_images"].shape == (30, 3, 32, 32)
    assert torch.equal(cache["test_images"], torch.from_numpy(data.reshape(30, 3, 32, 32)))
    assert cache["test_labels"].tolist() == labels
    first_batch, _ = make_images(20, seed=1)
    assert torch.equal(cache["train_images"][:20], torch.from_numpy(first_batch.reshape(20, 3, 32, 32)))


def test_second_run_does_nothing(tmp_path: Path) -> None:
    raw = raw_folder(tmp_path)
    first = prepare_dataset(raw, tmp_path / "out")
    stamp = (tmp_path / "out" / "cache.pt").stat().st_mtime_ns
    second = prepare_dataset(raw, tmp_path / "out")
    assert not first.already_prepared and second.already_prepared
    assert (tmp_path / "out" / "cache.pt").stat().st_mtime_ns == stamp


def test_no_png_writes_only_the_cache(tmp_path: Path) -> None:
    prepare_dataset(raw_folder(tmp_path), tmp_path / "out", write_png=False)
    assert (tmp_path / "out" / "cache.pt").is_file()
    assert not (tmp_path / "out" / "train").exists()


def _tar_with(path: Path, member: tarfile.TarInfo, payload: bytes = b"") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(member, io.BytesIO(payload) if payload else None)
    return path


@pytest.mark.parametrize("member", [tarfile.TarInfo("../escaped.txt"), tarfile.TarInfo("/tmp/absolute-escape.txt")])
def test_path_traversal_is_refused(tmp_path: Path, member: tarfile.TarInfo) -> None:
    member.size = 4
    archive_path = _tar_with(tmp_path / "evil.tar.gz", member, b"evil")
    with pytest.raises(UsageError, match="outside"):
        archive.safe_extract(archive_path, tmp_path / "target")
    assert not (tmp_path / "escaped.txt").exists()


def test_links_are_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(UsageError, match="links"):
        archive.safe_extract(_tar_with(tmp_path / "link.tar.gz", link), tmp_path / "target")


class _Exploit:
    def __reduce__(self):  # noqa: ANN204
        import os

        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path: Path) -> None:
    raw = raw_folder(tmp_path, overrides={"data_batch_3": pickle.dumps({"data": _Exploit()}, protocol=2)})
    with pytest.raises(UsageError, match=r"Refused to unpickle (posix|os)\.system"):
        prepare_dataset(raw, tmp_path / "out")
    assert not Path("pwned").exists()
    assert not (tmp_path / "out" / "cache.pt").exists()


def test_truncated_archive_is_a_clear_error(tmp_path: Path) -> None:
    raw = raw_folder(tmp_path)
    path = raw / "cifar-10-python.tar.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CifarError, match="truncated or corrupt"):
        prepare_dataset(raw, tmp_path / "out")


def test_empty_archive(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    with tarfile.open(raw / "cifar-10-python.tar.gz", "w:gz"):
        pass
    with pytest.raises(UsageError, match="empty archive"):
        prepare_dataset(raw, tmp_path / "out")


def test_missing_batch(tmp_path: Path) -> None:
    raw = raw_folder(tmp_path, overrides={"data_batch_4": None})
    with pytest.raises(UsageError, match="no data_batch_4"):
        prepare_dataset(raw, tmp_path / "out")


def test_wrong_shape(tmp_path: Path) -> None:
    bad = py2_pickle({b"data": np.zeros((5, 100), np.uint8), b"labels": [0] * 5})
    with pytest.raises(UsageError, match="N x 3072"):
        prepare_dataset(raw_folder(tmp_path, overrides={"test_batch": bad}), tmp_path / "out")


def test_label_out_of_range(tmp_path: Path) -> None:
    data, labels = make_images(10, seed=3)
    labels[4] = 12
    with pytest.raises(UsageError, match="label 12 is out of range"):
        prepare_dataset(
            raw_folder(tmp_path, overrides={"test_batch": batch_bytes(data, labels, "t")}), tmp_path / "out"
        )


def test_missing_archive_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="No archive") as error:
        prepare_dataset(tmp_path, tmp_path / "out")
    assert "cifar download" in error.value.hint


def test_processed_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        prepare_dataset(raw_folder(tmp_path), tmp_path / "file")

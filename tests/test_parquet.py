"""`cifar prepare --from-parquet`: data sets in the Hugging Face Hub's layout (data/parquet.py). The files are
written here in the Hub's exact schema for CIFAR-10 (`plain_text/train-00000-of-00001.parquet`, an `img` struct of
PNG `bytes` and `path`, an int64 `label` whose names are in the card's `dataset_info`) from a prepared archive, so
the parquet preparation can be compared with the archive's, image for image."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_cli.data.prepare import load_cache, prepare_dataset
from tests.conftest import LABEL_NAMES, SHARED_ARCHIVE, flat, run_cli

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CARD = """---
dataset_info:
  config_name: plain_text
  features:
  - name: img
    dtype: image
  - name: label
    dtype:
      class_label:
        names:
{names}
  splits:
  - name: train
    num_examples: {train}
  - name: test
    num_examples: {test}
configs:
- config_name: plain_text
  data_files:
  - split: train
    path: plain_text/train-*
  - split: test
    path: plain_text/test-*
---
# CIFAR-10, as the Hub keeps it (written by the test)
"""


def _png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _hub_table(images: torch.Tensor, labels: list[Any], *, label_type=None, metadata=None):  # noqa: ANN001, ANN202
    cells = [{"bytes": _png(image), "path": f"{index}.png"} for index, image in enumerate(images)]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("img", image_type), ("label", label_type or pa.int64())], metadata=metadata)
    return pa.table({"img": cells, "label": labels}, schema=schema)


def write_hub_layout(cache: dict[str, torch.Tensor], folder: Path, names: list[str]) -> Path:
    """The Hub's CIFAR-10 layout: a card with the class names and one parquet file per split."""
    (folder / "plain_text").mkdir(parents=True)
    for split in ("train", "test"):
        table = _hub_table(cache[f"{split}_images"], cache[f"{split}_labels"].tolist())
        pq.write_table(table, folder / "plain_text" / f"{split}-00000-of-00001.parquet", row_group_size=500)
    listed = "\n".join(f"          '{label}': {name}" for label, name in enumerate(names))
    counts = {split: len(cache[f"{split}_labels"]) for split in ("train", "test")}
    (folder / "README.md").write_text(CARD.format(names=listed, **counts))
    return folder


def _same_cache(parquet_dir: Path, archive_dir: Path) -> None:
    ours, theirs = load_cache(parquet_dir), load_cache(archive_dir)
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(ours[key], theirs[key]), key


def test_the_hubs_layout_prepares_to_the_archives_cache(tmp_path: Path, prepared_dir: Path) -> None:
    hub = write_hub_layout(load_cache(prepared_dir), tmp_path / "cifar10", LABEL_NAMES)
    prepared = run_cli("prepare", "--from-parquet", str(hub), "--processed-dir", str(tmp_path / "p"), "--no-png")
    assert prepared.exit_code == 0, prepared.output
    _same_cache(tmp_path / "p", prepared_dir)
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["class_names"] == LABEL_NAMES and manifest["layout"] == "parquet"
    again = run_cli(
        "prepare", "--from-parquet", str(hub / "plain_text"), "--processed-dir", str(tmp_path / "p"), "--no-png"
    )
    assert again.exit_code == 0 and "already prepared" in flat(again.output).lower(), again.output
    inside = run_cli("prepare", "--from-parquet", str(hub), "--processed-dir", str(hub / "out"))
    assert inside.exit_code == 2 and not (hub / "out").exists(), inside.output  # refused, and no folder left


@pytest.mark.skipif(not SHARED_ARCHIVE.is_file(), reason=f"{SHARED_ARCHIVE} is not on this machine")
def test_the_whole_shared_copy_in_the_hubs_layout_gives_the_same_cache(tmp_path: Path) -> None:
    archive_dir = tmp_path / "from-archive"
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / SHARED_ARCHIVE.name).symlink_to(SHARED_ARCHIVE)
    prepare_dataset(raw, archive_dir, write_png=False)
    hub = write_hub_layout(load_cache(archive_dir), tmp_path / "cifar10", LABEL_NAMES)
    prepared = run_cli("prepare", "--from-parquet", str(hub), "--processed-dir", str(tmp_path / "p"), "--no-png")
    assert prepared.exit_code == 0, prepared.output
    _same_cache(tmp_path / "p", archive_dir)
    assert len(load_cache(tmp_path / "p")["train_labels"]) == 50_000


def _small_hub(folder: Path, labels: list, images: torch.Tensor | None = None, **table_options) -> Path:
    images = images if images is not None else torch.randint(0, 255, (len(labels), 3, 32, 32), dtype=torch.uint8)
    (folder / "data").mkdir(parents=True)
    for split in ("train", "test"):
        pq.write_table(_hub_table(images, labels, **table_options), folder / "data" / f"{split}-0.parquet")
    return folder


def test_names_from_the_schema_metadata_and_string_labels(tmp_path: Path) -> None:
    features = {"img": {"_type": "Image"}, "label": {"names": ["cat", "dog"], "_type": "ClassLabel"}}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    hub = _small_hub(tmp_path / "a", [0, 1, 1, 0], metadata=metadata)
    assert run_cli("prepare", "--from-parquet", str(hub), "--processed-dir", str(tmp_path / "p")).exit_code == 0
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["class_names"] == ["cat", "dog"]
    named = _small_hub(tmp_path / "b", ["dog", "cat", "dog", "bird"], label_type=pa.string())
    assert run_cli("prepare", "--from-parquet", str(named), "--processed-dir", str(tmp_path / "q")).exit_code == 0
    assert json.loads((tmp_path / "q" / "manifest.json").read_text())["class_names"] == ["bird", "cat", "dog"]
    cache = load_cache(tmp_path / "q")
    assert cache["train_labels"].tolist() == [2, 1, 2, 0]


def test_bad_rows_are_named_by_file_and_row_or_skipped(tmp_path: Path) -> None:
    features = {"label": {"names": ["cat", "dog"], "_type": "ClassLabel"}}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    outside = _small_hub(tmp_path / "a", [0, 1, 7, 0], metadata=metadata)
    refused = run_cli("prepare", "--from-parquet", str(outside), "--processed-dir", str(tmp_path / "p"))
    assert refused.exit_code == 2, refused.output
    assert "train-0.parquet row 2: label 7 is outside the 2 classes" in flat(refused.output)
    assert not (tmp_path / "p" / "cache.pt").exists()

    hub = _small_hub(tmp_path / "b", [0, 1, 1, 0], metadata=metadata)
    table = pq.read_table(hub / "data" / "train-0.parquet")
    cells = table.column("img").to_pylist()
    cells[3]["bytes"] = b"not an image"
    damaged = table.set_column(0, "img", pa.array(cells, type=table.schema.field("img").type))
    pq.write_table(damaged.replace_schema_metadata(metadata), hub / "data" / "train-0.parquet")
    refused = run_cli("prepare", "--from-parquet", str(hub), "--processed-dir", str(tmp_path / "q"))
    assert refused.exit_code == 2 and "Cannot read image train-0.parquet row 3" in flat(refused.output)
    skipped = run_cli(
        "prepare", "--from-parquet", str(hub), "--processed-dir", str(tmp_path / "q"), "--skip-bad-images"
    )
    assert skipped.exit_code == 0, skipped.output
    assert "Skipped 1 bad rows" in flat(skipped.output)
    assert load_cache(tmp_path / "q")["train_labels"].tolist() == [0, 1, 1]


def test_a_split_column_and_files_without_split_names(tmp_path: Path) -> None:
    features = {"label": {"names": ["cat", "dog"], "_type": "ClassLabel"}}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    table = _hub_table(images, [0, 1, 1, 0], metadata=metadata).append_column("part", pa.array(["train", "test"] * 2))
    (tmp_path / "one").mkdir()
    pq.write_table(table, tmp_path / "one" / "all.parquet")
    unsplit = run_cli("prepare", "--from-parquet", str(tmp_path / "one"), "--processed-dir", str(tmp_path / "p"))
    assert unsplit.exit_code == 2 and "--split-column" in flat(unsplit.output)
    split = run_cli(
        "prepare", "--from-parquet", str(tmp_path / "one"), "--split-column", "part", "--processed-dir",
        str(tmp_path / "p"),
    )  # fmt: skip
    assert split.exit_code == 0, split.output
    cache = load_cache(tmp_path / "p")
    assert cache["train_labels"].tolist() == [0, 1] and torch.equal(cache["test_images"], images[[1, 3]])
    wrong = run_cli("prepare", "--from-parquet", str(tmp_path / "one"), "--image-column", "picture",
                    "--split-column", "part", "--processed-dir", str(tmp_path / "q"))  # fmt: skip
    assert wrong.exit_code == 2 and "no column 'picture'" in flat(wrong.output)
    assert np.array_equal(cache["train_images"].numpy(), images[[0, 2]].numpy())

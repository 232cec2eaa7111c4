"""Images kept as the Hugging Face Hub keeps data sets: parquet files with an image column (a struct of the encoded
`bytes` and a `path`, or plain binary) and a label column, one set of files per split, the class names in the
card's `dataset_info` (README.md) or in the schema's `huggingface` metadata.

Rows are read one record batch at a time into the output arrays, so memory is the cache being written, not the
files. pyarrow is an optional extra (`pip install 'cifar-cli[parquet]'`; `make install` installs it).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cifar_cli.data import archive
from cifar_cli.data.images import ImageError, decode_image
from cifar_cli.data.ownership import check_output_folder
from cifar_cli.data.prepare import (
    Prepared,
    PrepareResult,
    ProgressCallback,
    already_prepared,
    is_up_to_date,
    read_manifest,
    refuse_empty_training_classes,
    training_spec,
    write_prepared,
)
from cifar_cli.errors import UsageError
from cifar_cli.files import ensure_writable_folder

SPLIT_PATTERN = re.compile(r"^(train|test|validation|valid|val|eval)(?:[-_.]|$)")
TRAIN_NAMES = ("train",)
TEST_NAMES = ("test",)
VALIDATION_NAMES = ("validation", "valid", "val", "eval")
ROWS_PER_READ = 1024  # rows decoded at a time: a few MB of encoded images


def require_pyarrow() -> Any:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise UsageError(
            "Reading parquet files needs pyarrow, which is not installed.",
            hint="pip install 'cifar-cli[parquet]' (or pip install pyarrow); `make install` installs it.",
        ) from None
    return parquet


@dataclass
class ParquetSource:
    """The files of each split, the columns to read and the class names (label order)."""

    root: Path
    files: dict[str, list[Path]]
    image_column: str
    label_column: str
    class_names: list[str]
    labels_are_names: bool  # string labels, mapped through class_names
    split_column: str | None = None
    rows: dict[str, int] = field(default_factory=dict)


@dataclass
class ReadSplits:
    images: dict[str, np.ndarray]  # uint8 N x 3 x S x S per split
    labels: dict[str, np.ndarray]  # int64 N per split
    skipped: list[str]  # "file row N: why" of rows left out with --skip-bad-images


def scan_parquet(
    path: Path,
    image_column: str | None,
    label_column: str | None,
    split_column: str | None = None,
    validation: str = "train",
) -> ParquetSource:
    """The parquet files at `path` (a file, or a folder searched below) by split, their columns and class names."""
    parquet = require_pyarrow()
    files = _parquet_files(path)
    root = path if path.is_dir() else path.parent
    by_split = _files_by_split(files, root, split_column, validation)
    schema = parquet.read_schema(files[0])
    image = image_column or _guess(schema.names, ("img", "image", "images", "pixel_values"), "image", files[0])
    label = label_column or _guess(schema.names, ("label", "labels", "fine_label", "class"), "label", files[0])
    for column in (image, label, *([split_column] if split_column else [])):
        if column not in schema.names:
            raise UsageError(
                f"{files[0]} has no column {column!r} (its columns: {', '.join(schema.names)}).",
                hint="Name the columns with --image-column and --label-column.",
            )
    names = _class_names_from_card(root, label) or _class_names_from_schema(schema, label)
    labels_are_names = str(schema.field(label).type) in ("string", "large_string")
    if labels_are_names and not names:
        names = _distinct_labels(by_split, label)
    if not names:
        raise UsageError(
            f"The class names of column {label!r} are in neither the card ({root / 'README.md'}) nor the schema.",
            hint="Keep the data set's README.md beside its files, or store labels as their names.",
        )
    rows = {split: sum(parquet.ParquetFile(f).metadata.num_rows for f in fs) for split, fs in by_split.items()}
    return ParquetSource(root, by_split, image, label, names, labels_are_names, split_column, rows)


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UsageError(f"No parquet file or folder at {path}.")
    files = sorted(p for p in path.rglob("*.parquet") if not any(part.startswith(".") for part in p.parts))
    if not files:
        raise UsageError(f"No .parquet files under {path}.", hint="Pass the data set's folder or one of its files.")
    return files


def _files_by_split(files: list[Path], root: Path, split_column: str | None, validation: str) -> dict[str, list[Path]]:
    """Splits from the file names (train-*, test-*, validation-*), or, with a split column, every file in one."""
    if split_column is not None:
        return {"all": files}
    found: dict[str, list[Path]] = {"train": [], "test": []}
    unnamed = []
    for file in files:
        match = SPLIT_PATTERN.match(file.name)
        split = match.group(1) if match else None
        if split in VALIDATION_NAMES:
            split = None if validation == "skip" else validation
            if split is None:
                continue
        if split is None:
            unnamed.append(file)
        else:
            found[split].append(file)
    if unnamed or not found["train"] or not found["test"]:
        shown = ", ".join(str(f.relative_to(root)) for f in (unnamed or files)[:3])
        raise UsageError(
            f"Cannot tell the splits of {shown}: names must start with train-, test- or validation-, with files "
            "for both train and test.",
            hint="Name a column that holds the split with --split-column.",
        )
    return found


def _guess(columns: list[str], candidates: tuple[str, ...], what: str, file: Path) -> str:
    for name in candidates:
        if name in columns:
            return name
    raise UsageError(
        f"Cannot tell which column of {file} holds the {what} (its columns: {', '.join(columns)}).",
        hint=f"Name it with --{what}-column.",
    )


def _class_names_from_card(root: Path, label: str) -> list[str] | None:
    """`dataset_info.features[label].dtype.class_label.names` of the card's YAML front matter (one config, or
    a list of configs that agree)."""
    card = next((folder / "README.md" for folder in (root, root.parent) if (folder / "README.md").is_file()), None)
    if card is None:
        return None
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    try:
        front = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    infos = front.get("dataset_info") if isinstance(front, dict) else None
    for info in infos if isinstance(infos, list) else [infos]:
        for feature in (info or {}).get("features") or []:
            if isinstance(feature, dict) and feature.get("name") == label:
                names = ((feature.get("dtype") or {}).get("class_label") or {}).get("names")
                if isinstance(names, dict):
                    return [str(names[key]) for key in sorted(names, key=lambda k: int(k))]
                if isinstance(names, list):
                    return [str(name) for name in names]
    return None


def _class_names_from_schema(schema: Any, label: str) -> list[str] | None:
    """The `huggingface` metadata the datasets library writes into each file's schema."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        features = json.loads(raw)["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return None
    names = (features.get(label) or {}).get("names") if isinstance(features, dict) else None
    return [str(name) for name in names] if isinstance(names, list) else None


def _distinct_labels(files: dict[str, list[Path]], label: str) -> list[str]:
    parquet = require_pyarrow()
    names: set[str] = set()
    for file in (f for fs in files.values() for f in fs):
        column = parquet.read_table(file, columns=[label]).column(0)
        names |= {value for value in column.to_pylist() if value}
    return sorted(names)


def fingerprint(source: ParquetSource) -> str:
    """Names, sizes and times of the files, the columns and class names: whether a preparation is up to date."""
    digest = hashlib.md5("\0".join([source.image_column, source.label_column, *source.class_names]).encode())
    for split, files in source.files.items():
        for file in files:
            info = file.stat()
            digest.update(f"{split}\0{file}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def content_digest(source: ParquetSource) -> str:
    """MD5 over every file's bytes in split order: the data's identity, as a folder's image checksum."""
    digest = hashlib.md5()
    for files in source.files.values():
        for file in files:
            with file.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


def read_splits(source: ParquetSource, image_size: int, skip_bad: bool, on_progress: Any = None) -> ReadSplits:
    """Every row decoded into its split's arrays, batch by batch; a bad row is named by file and row, or skipped."""
    parquet = require_pyarrow()
    splits = ("train", "test") if source.split_column else tuple(source.files)
    total = sum(source.rows.values())
    capacity = {split: total if source.split_column else source.rows[split] for split in splits}
    images = {split: np.empty((capacity[split], image_size, image_size, 3), dtype=np.uint8) for split in splits}
    labels = {split: np.empty(capacity[split], dtype=np.int64) for split in splits}
    filled = dict.fromkeys(splits, 0)
    skipped: list[str] = []
    index = {name: label for label, name in enumerate(source.class_names)}
    done = 0
    columns = [source.image_column, source.label_column, *([source.split_column] if source.split_column else [])]
    for file in (f for fs in source.files.values() for f in fs):
        split_of_file = None if source.split_column else next(s for s, fs in source.files.items() if file in fs)
        row = 0
        for batch in parquet.ParquetFile(file).iter_batches(batch_size=ROWS_PER_READ, columns=columns):
            values = batch.to_pydict()
            for position in range(batch.num_rows):
                where = f"{file.name} row {row}"
                row += 1
                try:
                    split = split_of_file or _split_of(values[source.split_column][position], where)
                    label = _label(values[source.label_column][position], source, index, where)
                    pixels = decode_image(_image_bytes(values[source.image_column][position], where), image_size, where)
                except ImageError as error:
                    if not skip_bad:
                        raise ImageError(
                            error.message, hint="Fix the row, or pass --skip-bad-images to leave bad rows out."
                        ) from None
                    skipped.append(error.message)
                    continue
                images[split][filled[split]], labels[split][filled[split]] = pixels, label
                filled[split] += 1
            done += batch.num_rows
            if on_progress:
                on_progress("reading parquet", done, total)
    return ReadSplits(
        {s: images[s][: filled[s]].transpose(0, 3, 1, 2).copy() for s in splits},
        {s: labels[s][: filled[s]] for s in splits},
        skipped,
    )


def _split_of(value: Any, where: str) -> str:
    text = str(value).strip().lower() if value is not None else ""
    if text in TRAIN_NAMES or text in VALIDATION_NAMES:
        return "train"
    if text in TEST_NAMES:
        return "test"
    raise ImageError(f"{where}: split {value!r} is neither train nor test.")


def _label(value: Any, source: ParquetSource, index: dict[str, int], where: str) -> int:
    if value is None:
        raise ImageError(f"{where}: the label is missing.")
    if source.labels_are_names:
        if value not in index:
            raise ImageError(f"{where}: label {value!r} is not one of the classes.")
        return index[value]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(source.class_names):
        raise ImageError(
            f"{where}: label {value!r} is outside the {len(source.class_names)} classes (0 to "
            f"{len(source.class_names) - 1})."
        )
    return value


def _image_bytes(value: Any, where: str) -> bytes:
    """The encoded image of a cell: the Hub's {bytes, path} struct, or plain binary."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise ImageError(f"{where}: no image bytes.")
    return bytes(value)


def prepare_parquet(
    path: Path,
    processed_dir: Path,
    write_png: bool = True,
    on_progress: ProgressCallback | None = None,
    image_size: int = 32,
    skip_bad_images: bool = False,
    columns: tuple[str | None, str | None, str | None] = (None, None, None),
    validation: str = "train",
) -> PrepareResult:
    """Parquet files in the Hub's layout (data/parquet.py; `columns`: image, label, split) -> the same cache."""
    ensure_writable_folder(processed_dir)
    source = scan_parquet(path, *columns, validation=validation)
    wanted = {
        "dataset": "folder",
        "listing": fingerprint(source),
        "image_size": image_size,
        "skip_bad_images": skip_bad_images,
        "parquet_validation": validation,
    }
    existing = read_manifest(processed_dir)
    if existing and is_up_to_date(existing, processed_dir, wanted, write_png):
        return already_prepared(processed_dir, existing)
    owned = check_output_folder(processed_dir, trees=[source.root])
    read = read_splits(source, image_size, skip_bad_images, on_progress)
    splits = {name: archive.Split(read.images[name], read.labels[name]) for name in ("train", "test")}
    notes = [f"Skipped {len(read.skipped):,} bad rows (--skip-bad-images): {'; '.join(read.skipped[:3])}."]
    extra = {
        **wanted,
        "layout": "parquet",
        "skipped_images": read.skipped,
        "columns": [source.image_column, source.label_column],
    }
    prepared = Prepared(
        splits,
        training_spec(splits, source.class_names, image_size, "folder"),
        str(path.resolve()),
        content_digest(source),
        extra,
        notes if read.skipped else [],
    )
    refuse_empty_training_classes(prepared)
    return write_prepared(processed_dir, prepared, write_png, on_progress, owned)

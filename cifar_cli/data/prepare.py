"""Turn the downloaded archive into PNG-per-class folders and a uint8 tensor cache that training reads at once.

Layout of `processed_dir`:
    train/0_plane/00000.png ...   (file number = index in the split)
    test/...
    cache.pt        {"train_images": uint8 N x 3 x 32 x 32, "train_labels": int64 N, "test_images", ...}
    manifest.json   counts per split and class, source MD5, format version
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cifar_cli.data import archive
from cifar_cli.data.download import ARCHIVE_NAME, md5_of
from cifar_cli.errors import CifarError, UsageError
from cifar_cli.files import (
    ensure_writable_folder,
    require_free_space,
    tensor_file_bytes,
    write_atomically,
    write_text_atomically,
)

CACHE_FILE = "cache.pt"
PNG_FILE_BYTES = 4096  # a 32 x 32 PNG is about 3 KB, but takes one 4 KiB block
SPACE_HINT = "Free disk space or choose another --processed-dir."
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
CLASS_FOLDERS = [
    "0_plane",
    "1_car",
    "2_bird",
    "3_cat",
    "4_deer",
    "5_dog",
    "6_frog",
    "7_horse",
    "8_ship",
    "9_truck",
]
CLASS_NAMES = [folder.split("_", 1)[1] for folder in CLASS_FOLDERS]
# Called with (stage name, done, total) while PNG files are written.
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PrepareResult:
    processed_dir: Path
    already_prepared: bool
    counts: dict[str, int]


def prepare_dataset(
    raw_dir: Path,
    processed_dir: Path,
    write_png: bool = True,
    on_progress: ProgressCallback | None = None,
) -> PrepareResult:
    """Extract, validate and write the cache (and PNG folders); does nothing when the same inputs are prepared."""
    archive_path = raw_dir / ARCHIVE_NAME
    if not archive_path.is_file():
        raise UsageError(
            f"No archive at {archive_path}.", hint="Run `cifar download` first (or pass --raw-dir)."
        )
    ensure_writable_folder(processed_dir)
    source_md5 = md5_of(archive_path)
    existing = read_manifest(processed_dir)
    if existing and _is_up_to_date(existing, processed_dir, source_md5, write_png):
        return PrepareResult(processed_dir, True, existing["counts"])

    batch_folder = archive.safe_extract(archive_path, raw_dir)
    class_names = archive.read_class_names(batch_folder)
    splits = {
        "train": archive.read_split(batch_folder, archive.TRAIN_BATCHES),
        "test": archive.read_split(batch_folder, [archive.TEST_BATCH]),
    }
    require_free_space(processed_dir, _required_bytes(splits, write_png), "the prepared data", SPACE_HINT)
    _write_cache(processed_dir / CACHE_FILE, splits)
    if write_png:
        for name, split in splits.items():
            try:
                _write_png_folder(processed_dir / name, split, on_progress)
            except OSError as error:
                raise CifarError(
                    f"Could not write the {name} PNG folder in {processed_dir}: {error.strerror or error}.",
                    hint=SPACE_HINT,
                ) from None
    manifest = _manifest(splits, class_names, source_md5, write_png)
    write_text_atomically(processed_dir / MANIFEST_FILE, json.dumps(manifest, indent=2))
    return PrepareResult(processed_dir, False, manifest["counts"])


def read_manifest(processed_dir: Path) -> dict | None:
    try:
        return json.loads((processed_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_up_to_date(manifest: dict, processed_dir: Path, source_md5: str, write_png: bool) -> bool:
    return (
        manifest.get("format_version") == FORMAT_VERSION
        and manifest.get("source_md5") == source_md5
        and (processed_dir / CACHE_FILE).is_file()
        and (manifest.get("png") or not write_png)
        and all((processed_dir / split).is_dir() for split in ("train", "test") if write_png)
    )


def _write_cache(path: Path, splits: dict[str, archive.Split]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, split in splits.items():
        tensors[f"{name}_images"] = torch.from_numpy(np.ascontiguousarray(split.images))
        tensors[f"{name}_labels"] = torch.from_numpy(split.labels.astype(np.int64))
    write_atomically(path, tensor_file_bytes(tensors), hint=SPACE_HINT)


def _required_bytes(splits: dict[str, archive.Split], write_png: bool) -> int:
    """The cache holds every pixel and label; each PNG takes at least one 4 KiB file-system block."""
    cache = sum(split.images.nbytes + 8 * len(split.labels) for split in splits.values())
    pngs = sum(len(split.labels) for split in splits.values()) * PNG_FILE_BYTES if write_png else 0
    return cache + pngs


def _write_png_folder(folder: Path, split: archive.Split, on_progress: ProgressCallback | None) -> None:
    """Write into a sibling temporary folder, then swap it in, so a crash never leaves half a folder in place."""
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    for class_folder in CLASS_FOLDERS:
        (staging / class_folder).mkdir()
    total = len(split.labels)

    def write_one(index: int) -> None:
        pixels = split.images[index].transpose(1, 2, 0)  # HWC for PIL
        destination = staging / CLASS_FOLDERS[int(split.labels[index])] / f"{index:05d}.png"
        Image.fromarray(pixels).save(destination, compress_level=1)

    try:
        # zlib and PIL's encoder release the GIL, so threads use every core.
        with ThreadPoolExecutor(max_workers=4) as pool:
            for done, _ in enumerate(pool.map(write_one, range(total)), start=1):
                if on_progress and (done % 500 == 0 or done == total):
                    on_progress(folder.name, done, total)
        if folder.exists():
            shutil.rmtree(folder)
        staging.replace(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _manifest(splits: dict[str, archive.Split], class_names: list[str], source_md5: str, png: bool) -> dict:
    counts = {name: int(len(split.labels)) for name, split in splits.items()}
    per_class = {
        name: {CLASS_FOLDERS[c]: int((split.labels == c).sum()) for c in range(archive.NUM_CLASSES)}
        for name, split in splits.items()
    }
    return {
        "format_version": FORMAT_VERSION,
        "source_md5": source_md5,
        "archive_class_names": class_names,
        "class_folders": CLASS_FOLDERS,
        "counts": counts,
        "per_class": per_class,
        "png": png,
    }


def load_cache(processed_dir: Path) -> dict[str, torch.Tensor]:
    """The tensor cache as uint8 images and int64 labels; a clear error when it is missing or damaged."""
    path = processed_dir / CACHE_FILE
    if not path.is_file():
        raise UsageError(
            f"No prepared data at {path}.", hint="Run `cifar prepare` (or pass --processed-dir)."
        )
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for damaged files
        raise CifarError(
            f"{path} is damaged ({type(error).__name__}).", hint="Run `cifar prepare` again."
        ) from None
    expected = {"train_images", "train_labels", "test_images", "test_labels"}
    if not isinstance(tensors, dict) or not expected <= set(tensors):
        raise CifarError(f"{path} is not a cifar tensor cache.", hint="Run `cifar prepare` again.")
    return tensors

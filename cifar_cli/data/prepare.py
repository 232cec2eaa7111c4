"""Turn a downloaded archive or an image-folder tree into PNG-per-class folders and a uint8 tensor cache that
training reads at once.

Layout of `processed_dir`:
    train/0_plane/00000.png ...   (file number = index in the split; class folders "<label>_<name>")
    test/...
    cache.pt        {"train_images": uint8 N x 3 x S x S, "train_labels": int64 N, "test_images", ...}
    manifest.json   the data set, class names, image size, per-channel mean/std of the training images, counts per
                    split and class, the source and its checksum, format version
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cifar_cli.data import archive, csv_list, folder
from cifar_cli.data.download import md5_of
from cifar_cli.data.ownership import CACHE_FILE, MANIFEST_FILE, PNG_SPLITS, Owned, check_output_folder, written_names
from cifar_cli.data.spec import CIFAR10_CLASS_NAMES, DataSpec, channel_statistics
from cifar_cli.errors import CifarError, UsageError
from cifar_cli.files import (
    ensure_writable_folder,
    require_free_space,
    tensor_file_bytes,
    write_atomically,
    write_text_atomically,
)

PNG_FILE_BYTES = 4096  # a 32 x 32 PNG is about 3 KB, but takes one 4 KiB block
SPACE_HINT = "Free disk space or choose another --processed-dir."
FORMAT_VERSION = 2  # 2: data set, class names, image size and statistics stored (1 was CIFAR-10 only)
CLASS_NAMES = list(CIFAR10_CLASS_NAMES)  # CIFAR-10's short names, used instead of the archive's long ones
# Called with (stage name, done, total) while images are read or PNG files written.
ProgressCallback = Callable[[str, int, int], None]


def class_folders(class_names: list[str] | tuple[str, ...]) -> list[str]:
    """ "<label>_<name>" with the label zero-padded so that folders sort in label order ("0_plane", "07_bed")."""
    digits = len(str(len(class_names) - 1))
    return [f"{label:0{digits}d}_{re.sub(r'[^0-9A-Za-z._-]+', '_', name)}" for label, name in enumerate(class_names)]


@dataclass(frozen=True)
class PrepareResult:
    processed_dir: Path
    already_prepared: bool
    counts: dict[str, int]
    spec: DataSpec
    notes: list[str] = field(default_factory=list)  # what was ignored or skipped, for the user
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class folder -> images


@dataclass
class Prepared:
    """Everything a manifest describes, before it is written."""

    splits: dict[str, archive.Split]
    spec: DataSpec
    source: str
    source_md5: str
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def prepare_dataset(
    raw_dir: Path,
    processed_dir: Path,
    write_png: bool = True,
    on_progress: ProgressCallback | None = None,
    dataset: str = "cifar10",
    label_set: str = "fine",
) -> PrepareResult:
    """Extract, validate and write the cache (and PNG folders) of an official archive; does nothing when the same
    inputs are prepared."""
    layout = archive.archive_layout(dataset, label_set)
    archive_path = raw_dir / layout.archive_name
    if not archive_path.is_file():
        raise UsageError(
            f"No archive at {archive_path}.",
            hint=f"Run `cifar download{'' if dataset == 'cifar10' else ' --dataset ' + dataset}` first "
            "(or pass --raw-dir).",
        )
    ensure_writable_folder(processed_dir)
    source_md5 = md5_of(archive_path)
    wanted = {"source_md5": source_md5, "dataset": dataset, "label_set": label_set}
    existing = read_manifest(processed_dir)
    if existing and is_up_to_date(existing, processed_dir, wanted, write_png):
        return already_prepared(processed_dir, existing)
    # The archive and what it extracts may lie in the output folder (--raw-dir equal to --processed-dir).
    owned = check_output_folder(processed_dir, own_files=[layout.archive_name, layout.folder])

    batch_folder = archive.safe_extract(archive_path, raw_dir, layout.folder)
    archive_names = archive.read_class_names(batch_folder, layout)
    splits = {
        "train": archive.read_split(batch_folder, layout.train_files, layout),
        "test": archive.read_split(batch_folder, layout.test_files, layout),
    }
    names = CLASS_NAMES if dataset == "cifar10" else archive_names
    prepared = Prepared(
        splits,
        training_spec(splits, names, 32, dataset),
        str(archive_path),
        source_md5,
        {"label_set": label_set, "archive_class_names": archive_names},
    )
    return write_prepared(processed_dir, prepared, write_png, on_progress, owned)


def prepare_folder(
    source: Path,
    processed_dir: Path,
    write_png: bool = True,
    on_progress: ProgressCallback | None = None,
    image_size: int = 32,
    test_fraction: float = 0.2,
    skip_bad_images: bool = False,
) -> PrepareResult:
    """An ImageFolder tree -> the same cache, manifest and PNG folders as an archive; does nothing when the same
    files (names, sizes, times) are already prepared the same way."""
    scan = folder.scan_folder(source, test_fraction)
    return _prepare_scan(scan, processed_dir, write_png, on_progress, image_size, test_fraction, skip_bad_images)


def prepare_csv(
    csv_file: Path,
    processed_dir: Path,
    write_png: bool = True,
    on_progress: ProgressCallback | None = None,
    image_size: int = 32,
    test_fraction: float = 0.2,
    skip_bad_images: bool = False,
    root: Path | None = None,
) -> PrepareResult:
    """A CSV list of images and labels (data/csv_list.py) -> the same cache as an image folder."""
    scan = csv_list.scan_csv(csv_file, test_fraction, root, skip_missing=skip_bad_images)
    return _prepare_scan(scan, processed_dir, write_png, on_progress, image_size, test_fraction, skip_bad_images)


def _prepare_scan(
    scan: folder.FolderScan,
    processed_dir: Path,
    write_png: bool,
    on_progress: ProgressCallback | None,
    image_size: int,
    test_fraction: float,
    skip_bad_images: bool,
) -> PrepareResult:
    ensure_writable_folder(processed_dir)
    listing = _listing_fingerprint(scan)
    wanted = {"dataset": "folder", "listing": listing, "image_size": image_size, "skip_bad_images": skip_bad_images}
    if scan.layout in folder.HELD_OUT_LAYOUTS:
        wanted["test_fraction"] = test_fraction
    existing = read_manifest(processed_dir)
    if existing and is_up_to_date(existing, processed_dir, wanted, write_png):
        return already_prepared(processed_dir, existing)
    if scan.layout.startswith("csv"):
        listed = {item.path.parent for files in scan.files.values() for item in files}
        owned = check_output_folder(processed_dir, listed_folders=listed)
    else:
        owned = check_output_folder(processed_dir, trees=[scan.root])

    splits, digest, skipped = _read_splits(scan, image_size, skip_bad_images, on_progress)
    prepared = Prepared(
        splits,
        training_spec(splits, scan.class_names, image_size, "folder"),
        str(scan.root),
        digest,
        {
            **wanted,
            "layout": scan.layout,
            "split_seed": folder.SPLIT_SEED,
            "ignored_files": scan.ignored_files,
            "skipped_images": skipped,
            "empty_classes": scan.empty_classes,
        },
        _folder_notes(scan, skipped),
    )
    refuse_empty_training_classes(prepared)
    return write_prepared(processed_dir, prepared, write_png, on_progress, owned)


def _read_splits(
    scan: folder.FolderScan, image_size: int, skip_bad: bool, on_progress: ProgressCallback | None
) -> tuple[dict[str, archive.Split], str, list[str]]:
    """Every split's pixels and labels, one checksum of all files (the data's identity), the skipped files."""
    splits: dict[str, archive.Split] = {}
    digests, skipped = [], []
    for name, files in scan.files.items():
        read = folder.read_images(files, scan.root, image_size, skip_bad, on_progress, f"reading {name}")
        splits[name] = archive.Split(read.images.numpy(), read.labels.numpy())
        digests.append(read.digest)
        skipped += read.skipped
    return splits, hashlib.md5("".join(digests).encode()).hexdigest(), skipped


def training_spec(splits: dict[str, archive.Split], names: list[str], image_size: int, dataset: str) -> DataSpec:
    """The statistics come from the training images only (the test split is never looked at)."""
    mean, std = channel_statistics(torch.from_numpy(splits["train"].images))
    return DataSpec(tuple(names), mean, std, image_size, dataset)  # type: ignore[arg-type]


def _listing_fingerprint(scan: folder.FolderScan) -> str:
    """Names, sizes and times of the files, their labels and the class names (a label renamed in a CSV list
    changes no file but does change the data)."""
    digest = hashlib.md5("\0".join(scan.class_names).encode())
    for split, files in scan.files.items():
        for item in files:
            info = item.path.stat()
            digest.update(f"{split}\0{item.path}\0{item.label}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _folder_notes(scan: folder.FolderScan, skipped: list[str]) -> list[str]:
    notes = []
    if scan.empty_classes:
        notes.append(f"Skipped class folders without images: {', '.join(scan.empty_classes)}.")
    if scan.ignored_files and scan.layout.startswith("csv"):
        notes.append(f"Skipped {scan.ignored_files:,} rows whose files do not exist (--skip-bad-images).")
    elif scan.ignored_files:
        notes.append(f"Ignored {scan.ignored_files:,} files that are not images (or are hidden).")
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        notes.append(f"Skipped {len(skipped):,} unreadable images (--skip-bad-images): {shown}.")
    return notes


def refuse_empty_training_classes(prepared: Prepared) -> None:
    present = set(np.unique(prepared.splits["train"].labels).tolist())
    missing = [name for label, name in enumerate(prepared.spec.class_names) if label not in present]
    if missing:
        raise UsageError(
            f"No readable training images left for: {', '.join(missing)}.",
            hint="Add images to those classes or remove their folders.",
        )


def write_prepared(
    processed_dir: Path, prepared: Prepared, write_png: bool, on_progress: ProgressCallback | None, owned: Owned
) -> PrepareResult:
    splits = prepared.splits
    require_free_space(processed_dir, _required_bytes(splits, write_png), "the prepared data", SPACE_HINT)
    folders = class_folders(prepared.spec.class_names)
    _mark_under_way(processed_dir, owned, folders)  # until the new manifest is written, nothing is prepared
    _write_cache(processed_dir / CACHE_FILE, splits)
    _remove_unwanted_png_folders(processed_dir, owned, write_png)
    if write_png:
        for name, split in splits.items():
            try:
                _write_png_folder(processed_dir / name, split, folders, on_progress)
            except OSError as error:
                raise CifarError(
                    f"Could not write the {name} PNG folder in {processed_dir}: {error.strerror or error}.",
                    hint=SPACE_HINT,
                ) from None
    manifest = _manifest(prepared, folders, write_png)
    write_text_atomically(processed_dir / MANIFEST_FILE, json.dumps(manifest, indent=2))
    return PrepareResult(processed_dir, False, manifest["counts"], prepared.spec, prepared.notes, manifest["per_class"])


def _mark_under_way(processed_dir: Path, owned: Owned, folders: list[str]) -> None:
    """A manifest that owns what was there and what is about to be written, and says the data is not ready."""
    under_way = {
        "format_version": FORMAT_VERSION,
        "incomplete": True,
        "written": sorted(owned.top | set(written_names(True))),
        "class_folders": sorted(owned.class_folders | set(folders)),
    }
    write_text_atomically(processed_dir / MANIFEST_FILE, json.dumps(under_way, indent=2))


def _remove_unwanted_png_folders(processed_dir: Path, owned: Owned, write_png: bool) -> None:
    """--no-png after a preparation with PNG folders: its folders (checked to hold only its files) would show
    other images than the cache."""
    if write_png:
        return
    for split in PNG_SPLITS:
        if split in owned.top and (processed_dir / split).is_dir():
            shutil.rmtree(processed_dir / split)


def already_prepared(processed_dir: Path, manifest: dict) -> PrepareResult:
    return PrepareResult(
        processed_dir, True, manifest["counts"], DataSpec.from_dict(manifest), per_class=manifest.get("per_class", {})
    )


def read_manifest(processed_dir: Path) -> dict | None:
    try:
        manifest = json.loads((processed_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    # A preparation under way (or killed) leaves a manifest that only records what it owns.
    return manifest if isinstance(manifest, dict) and not manifest.get("incomplete") else None


def read_spec(processed_dir: Path) -> DataSpec:
    """The prepared data's classes, size and statistics (CIFAR-10's for data prepared by older versions)."""
    return DataSpec.from_dict(read_manifest(processed_dir))


def is_up_to_date(manifest: dict, processed_dir: Path, wanted: dict[str, Any], write_png: bool) -> bool:
    return (
        manifest.get("format_version") == FORMAT_VERSION
        and all(manifest.get(key) == value for key, value in wanted.items())
        and (processed_dir / CACHE_FILE).is_file()
        and (manifest.get("png") or not write_png)
        and all((processed_dir / split).is_dir() for split in PNG_SPLITS if write_png)
    )


def _write_cache(path: Path, splits: dict[str, archive.Split]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, split in splits.items():
        tensors[f"{name}_images"] = torch.from_numpy(np.ascontiguousarray(split.images))
        tensors[f"{name}_labels"] = torch.from_numpy(split.labels.astype(np.int64))
    write_atomically(path, tensor_file_bytes(tensors), hint=SPACE_HINT)


def _required_bytes(splits: dict[str, archive.Split], write_png: bool) -> int:
    """The cache holds every pixel and label; each PNG takes at least one 4 KiB file-system block, and a larger
    image up to its raw size (fast PNG compression of photographs saves little), in whole blocks."""
    cache = sum(split.images.nbytes + 8 * len(split.labels) for split in splits.values())
    image_bytes = int(np.prod(splits["train"].images.shape[1:]))
    png_bytes = max(PNG_FILE_BYTES, -(-image_bytes // PNG_FILE_BYTES) * PNG_FILE_BYTES)
    pngs = sum(len(split.labels) for split in splits.values()) * png_bytes if write_png else 0
    return cache + pngs


def _write_png_folder(
    target: Path, split: archive.Split, folders: list[str], on_progress: ProgressCallback | None
) -> None:
    """Write into a sibling temporary folder, then swap it in, so a crash never leaves half a folder in place."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    for class_folder in folders:
        (staging / class_folder).mkdir()
    total = len(split.labels)

    def write_one(index: int) -> None:
        pixels = split.images[index].transpose(1, 2, 0)  # HWC for PIL
        destination = staging / folders[int(split.labels[index])] / f"{index:05d}.png"
        Image.fromarray(pixels).save(destination, compress_level=1)

    try:
        # zlib and PIL's encoder release the GIL, so threads use every core.
        with ThreadPoolExecutor(max_workers=4) as pool:
            for done, _ in enumerate(pool.map(write_one, range(total)), start=1):
                if on_progress and (done % 500 == 0 or done == total):
                    on_progress(f"writing {target.name}", done, total)
        if target.exists():
            shutil.rmtree(target)
        staging.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _manifest(prepared: Prepared, folders: list[str], png: bool) -> dict:
    splits = prepared.splits
    counts = {name: int(len(split.labels)) for name, split in splits.items()}
    per_class = {
        name: {folders[c]: int((split.labels == c).sum()) for c in range(len(folders))}
        for name, split in splits.items()
    }
    return {
        "format_version": FORMAT_VERSION,
        **prepared.spec.to_dict(),
        "source": prepared.source,
        "source_md5": prepared.source_md5,
        **prepared.extra,
        "class_folders": folders,
        "written": written_names(png),
        "counts": counts,
        "per_class": per_class,
        "png": png,
    }


def load_cache(processed_dir: Path) -> dict[str, torch.Tensor]:
    """The tensor cache as uint8 images and int64 labels; a clear error when it is missing or damaged."""
    path = processed_dir / CACHE_FILE
    if not path.is_file():
        raise UsageError(f"No prepared data at {path}.", hint="Run `cifar prepare` (or pass --processed-dir).")
    try:
        # Memory-mapped: the processes of one machine (--nproc, torchrun) share one copy in the page cache
        # instead of reading one each; tensors indexed out of it (a validation split) are private copies.
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for damaged files
        raise CifarError(f"{path} is damaged ({type(error).__name__}).", hint="Run `cifar prepare` again.") from None
    expected = {"train_images", "train_labels", "test_images", "test_labels"}
    if not isinstance(tensors, dict) or not expected <= set(tensors):
        raise CifarError(f"{path} is not a cifar tensor cache.", hint="Run `cifar prepare` again.")
    return tensors

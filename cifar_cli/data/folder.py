"""Read an image-folder tree (torchvision's ImageFolder layout) into uint8 tensors, refusing what is unsafe.

Layouts: `DIR/<class>/**/*.{png,jpg,jpeg,webp,bmp}` (one tree, a seeded stratified test split is held out), or
`DIR/train/<class>/...` plus `DIR/test/<class>/...`. Classes are the class folders in sorted order, as ImageFolder.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cifar_cli.data.images import ImageError, decode_image
from cifar_cli.errors import UsageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
SPLIT_FOLDERS = ("train", "test")
# Layouts whose test split is held out here (a seeded, stratified share of each class).
HELD_OUT_LAYOUTS = ("single", "csv")
SPLIT_SEED = 0  # the held-out test split of a single tree is the same on every machine and every run
# Decoding threads: Pillow releases the GIL while it decodes and resizes, so threads use every core; a few more
# than the cores hide file-system waits.
READ_THREADS = max(2, min(16, 2 * (os.cpu_count() or 1)))
ProgressCallback = Callable[[str, int, int], None]  # (stage, images done, total)


@dataclass(frozen=True)
class ImageFile:
    path: Path
    label: int


@dataclass
class FolderScan:
    """What a tree holds: class names (label order) and the image files of each split."""

    root: Path
    # "single" (the test split is held out here) or "split" (train/ and test/ trees); a CSV list: "csv" (held out
    # here) or "csv-split" (a split column)
    layout: str
    class_names: list[str]
    files: dict[str, list[ImageFile]]
    # Files that are not images (by suffix), hidden files, files outside class folders; a CSV's missing files.
    ignored_files: int = 0
    empty_classes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReadImages:
    images: torch.Tensor  # uint8 N x 3 x S x S
    labels: torch.Tensor  # int64 N
    digest: str  # MD5 over every file's relative path and bytes, in order: the data's identity
    skipped: list[str]  # unreadable images skipped with --skip-bad-images (relative paths)


def scan_folder(root: Path, test_fraction: float) -> FolderScan:
    """List the classes and image files of `root`; a single tree gets its stratified, seeded test split here."""
    if not root.is_dir():
        raise UsageError(f"No folder at {root}.", hint="Pass the folder that holds one folder per class.")
    root = root.resolve()
    children = _visible_folders(root, root)
    if {child.name for child in children} >= set(SPLIT_FOLDERS):
        return _scan_split_layout(root)
    classes, ignored = _class_files(root, root)
    names, empty = _keep_nonempty(classes)
    labelled = [[ImageFile(path, label) for path in classes[name]] for label, name in enumerate(names)]
    train, test = hold_out(labelled, test_fraction)
    return FolderScan(root, "single", names, {"train": train, "test": test}, ignored, empty)


def _scan_split_layout(root: Path) -> FolderScan:
    train_classes, ignored = _class_files(root / "train", root)
    test_classes, test_ignored = _class_files(root / "test", root)
    names, empty = _keep_nonempty(train_classes)
    unknown = sorted(set(test_classes) - set(train_classes))
    if unknown:
        raise UsageError(
            f"{root / 'test'} has class folders that {root / 'train'} lacks: {', '.join(unknown)}.",
            hint="Every test class needs training images; rename or remove those folders.",
        )
    files = {
        "train": [ImageFile(path, label) for label, name in enumerate(names) for path in train_classes[name]],
        "test": [ImageFile(path, label) for label, name in enumerate(names) for path in test_classes.get(name, [])],
    }
    if not files["test"]:
        raise UsageError(f"{root / 'test'} holds no images.", hint="Put test images in DIR/test/<class>/.")
    return FolderScan(root, "split", names, files, ignored + test_ignored, empty)


def _class_files(tree: Path, root: Path) -> tuple[dict[str, list[Path]], int]:
    """{class folder name: sorted image paths below it}, and how many files were ignored."""
    if not tree.is_dir():
        raise UsageError(f"No folder at {tree}.")
    ignored = sum(1 for entry in tree.iterdir() if not entry.is_dir())  # files beside the class folders
    classes: dict[str, list[Path]] = {}
    for folder in _visible_folders(tree, root):
        images, skipped = _image_files(folder, root)
        classes[folder.name] = images
        ignored += skipped
    refuse_colliding(list(classes))
    return classes, ignored


def _visible_folders(tree: Path, root: Path) -> list[Path]:
    folders = []
    for entry in sorted(tree.iterdir()):
        _refuse_escape(entry, root)
        if entry.is_dir() and not entry.name.startswith("."):
            folders.append(entry)
    return folders


def _image_files(folder: Path, root: Path) -> tuple[list[Path], int]:
    """Image files anywhere below `folder` (symbolic links must stay inside `root`), and the others' count."""
    images: list[Path] = []
    ignored = 0
    seen: set[Path] = set()
    for current, folders, files in os.walk(folder, followlinks=True):
        here = Path(current)
        _refuse_escape(here, root)
        if here.resolve() in seen:  # a link back up the tree: walk it once
            folders.clear()
            continue
        seen.add(here.resolve())
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(files):
            path = here / name
            _refuse_escape(path, root)
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                ignored += 1
            else:
                images.append(path)
    return images, ignored


def _refuse_escape(path: Path, root: Path) -> None:
    if not path.is_symlink():
        return
    target = path.resolve()
    if target != root and root not in target.parents:
        raise UsageError(
            f"Refused {path}: it is a symbolic link to {target}, outside {root}.",
            hint="Copy the files into the folder instead of linking to them.",
        )


def class_key(name: str) -> str:
    """Two class names that would be one folder on a case-insensitive disk or one name to a reader collide."""
    return re.sub(r"[\s_\-]+", "_", name.strip()).casefold()


def refuse_colliding(names: list[str]) -> None:
    by_key: dict[str, list[str]] = {}
    for name in names:
        by_key.setdefault(class_key(name), []).append(name)
    collisions = [group for group in by_key.values() if len(group) > 1]
    if collisions:
        listed = "; ".join(" and ".join(repr(name) for name in group) for group in collisions)
        raise UsageError(
            f"Class folders whose names differ only in case, spaces, '-' or '_': {listed}.",
            hint="Merge or rename them so that each class has one folder.",
        )


def _keep_nonempty(classes: dict[str, list[Path]]) -> tuple[list[str], list[str]]:
    names = sorted(name for name, files in classes.items() if files)
    empty = sorted(name for name, files in classes.items() if not files)
    if len(names) < 2:
        found = ", ".join(names) or "none"
        raise UsageError(
            f"A classifier needs at least two classes with images; found {len(names)} ({found}).",
            hint="Expected DIR/<class>/<image> (or DIR/train/<class>/ and DIR/test/<class>/).",
        )
    return names, empty


def hold_out(labelled: list[list[ImageFile]], test_fraction: float) -> tuple[list[ImageFile], list[ImageFile]]:
    """Per class, a seeded random `test_fraction` (rounded, at least one where the class has two images)."""
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    train: list[ImageFile] = []
    test: list[ImageFile] = []
    for files in labelled:
        order = torch.randperm(len(files), generator=generator).tolist()
        held = min(len(files) - 1, max(1, round(len(files) * test_fraction)))
        test_index = set(order[:held])
        train += [f for i, f in enumerate(files) if i not in test_index]
        test += [f for i, f in enumerate(files) if i in test_index]
    return train, test


def _read_file(path: Path) -> bytes:
    """The file's bytes; a file that cannot be read (gone, no permission) is an unreadable image, named."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise ImageError(f"Cannot read {path}: {error.strerror or error}.") from None


def shown_path(path: Path, root: Path) -> str:
    """`path` relative to `root` where it lies below it (a folder's files; most of a CSV's), else absolute."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def read_images(
    files: list[ImageFile],
    root: Path,
    image_size: int,
    skip_bad: bool,
    on_progress: ProgressCallback | None = None,
    stage: str = "reading",
) -> ReadImages:
    """Decode, convert to RGB and resize every file (threads); name the first unreadable one, or skip them."""
    total = len(files)
    pixels = np.empty((total, image_size, image_size, 3), dtype=np.uint8)
    digests: list[str] = [""] * total
    bad: list[str] = []

    def read_one(index: int) -> None:
        source = files[index].path
        try:
            payload = _read_file(source)
            digests[index] = hashlib.md5(payload).hexdigest()
            pixels[index] = decode_image(payload, image_size, str(source))
        except ImageError as error:
            if not skip_bad:
                raise ImageError(
                    error.message, hint="Fix or remove it, or pass --skip-bad-images to leave unreadable images out."
                ) from None
            bad.append(shown_path(source, root))

    pool = ThreadPoolExecutor(max_workers=READ_THREADS)
    try:
        for done, _ in enumerate(pool.map(read_one, range(total)), start=1):
            if on_progress and (done % 500 == 0 or done == total):
                on_progress(stage, done, total)
    finally:  # after the first bad image, the queued files are not read
        pool.shutdown(wait=True, cancel_futures=True)
    skipped = set(bad)
    kept = [i for i, f in enumerate(files) if shown_path(f.path, root) not in skipped]
    digest = hashlib.md5()
    for index in kept:
        digest.update(f"{shown_path(files[index].path, root)}\0{digests[index]}\n".encode())
    images = torch.from_numpy(pixels[kept]).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([files[i].label for i in kept], dtype=torch.int64)
    return ReadImages(images, labels, digest.hexdigest(), sorted(bad))

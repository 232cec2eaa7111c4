"""What `cifar prepare` may replace in its output folder: only what its own manifest says it wrote.

A prepared folder holds `cache.pt`, `manifest.json` and, with PNG folders, `train/` and `test/`, each of one
folder per class holding `NNNNN.png` files. The manifest lists these (`written`, `class_folders`); a preparation
that is under way leaves a manifest that says so (`incomplete`), so that one killed half way still owns what it
wrote. Before anything is written, the output folder is checked: it may not be a source folder, lie inside one, or
hold one, and every entry prepare would replace must be one it wrote. Anything else is named and refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cifar_cli.errors import UsageError

CACHE_FILE = "cache.pt"
MANIFEST_FILE = "manifest.json"
PNG_SPLITS = ("train", "test")
# What a manifest of format 2 written before ownership was recorded had written, when it names no list itself.
LEGACY_WRITTEN = (CACHE_FILE, MANIFEST_FILE, *PNG_SPLITS)
PNG_NAME = re.compile(r"\d{5,}\.png")  # "00042.png": the index of the image in its split
SHOWN = 5  # foreign entries named in the error; the rest are counted
MOVE_HINT = (
    "Choose a new or empty --processed-dir (prepare then writes only there), or move those files elsewhere. "
    "`cifar prepare` replaces only what its own manifest.json lists."
)


@dataclass(frozen=True)
class Owned:
    """The entries of an output folder that an earlier preparation wrote."""

    top: frozenset[str]  # names directly in the folder
    class_folders: frozenset[str]  # folder names inside train/ and test/


def read_owned(processed_dir: Path) -> Owned:
    """What the folder's manifest (complete or under way) says prepare wrote; nothing without a manifest."""
    try:
        manifest = json.loads((processed_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return Owned(frozenset(), frozenset())
    if not isinstance(manifest, dict) or not isinstance(manifest.get("class_folders", []), list):
        return Owned(frozenset(), frozenset())
    written = manifest.get("written", LEGACY_WRITTEN)
    return Owned(frozenset(map(str, written)) | {MANIFEST_FILE}, frozenset(map(str, manifest.get("class_folders", []))))


def written_names(write_png: bool) -> list[str]:
    return [CACHE_FILE, MANIFEST_FILE, *(PNG_SPLITS if write_png else ())]


def check_output_folder(
    processed_dir: Path, trees: Iterable[Path] = (), listed_folders: Iterable[Path] = (), own_files: Iterable[str] = ()
) -> Owned:
    """Refuse an output folder that overlaps a source or holds entries prepare did not write (besides `own_files`,
    names that this tool wrote there itself, such as a downloaded archive). A source tree (`--from-folder`) may
    not hold the output, nor lie inside it: every image below it is read. The folders a CSV list's images are in
    may not be the output or lie inside it; an output inside one of them is harmless, as only the listed files
    are read. Returns what prepare owns there."""
    output = processed_dir.resolve()
    for tree in {Path(tree).resolve() for tree in trees}:
        _refuse_inside(output, tree)
        _refuse_holding(output, tree)
    for listed in {Path(listed).resolve() for listed in listed_folders}:
        _refuse_holding(output, listed)
    if not output.is_dir():
        return Owned(frozenset(), frozenset())
    owned = read_owned(output)
    foreign = _foreign_entries(output, owned, set(own_files))
    if foreign:
        shown = ", ".join(str(path.relative_to(output)) for path in foreign[:SHOWN])
        more = f" and {len(foreign) - SHOWN:,} more" if len(foreign) > SHOWN else ""
        raise UsageError(
            f"--processed-dir {processed_dir} holds files that `cifar prepare` did not write: {shown}{more}.",
            hint=MOVE_HINT,
        )
    return owned


def _refuse_inside(output: Path, source: Path) -> None:
    if output == source or source in output.parents:
        raise UsageError(
            f"--processed-dir {output} is inside the source folder {source}: preparing there would mix the "
            "prepared images with yours.",
            hint="Choose a --processed-dir outside the folders your images are in.",
        )


def _refuse_holding(output: Path, source: Path) -> None:
    if output == source:
        raise UsageError(
            f"--processed-dir {output} holds images the CSV list names: preparing there could replace them.",
            hint="Choose a --processed-dir outside the folders your images are in.",
        )
    if output in source.parents:
        raise UsageError(
            f"--processed-dir {output} holds the source folder {source}: preparing there could replace your images.",
            hint="Choose a --processed-dir outside the folders your images are in.",
        )


def _foreign_entries(output: Path, owned: Owned, own_files: set[str]) -> list[Path]:
    """Entries prepare would replace or remove without having written them. Hidden names directly in the folder
    are never touched (prepare's own temporaries are hidden) and so are not in the way."""
    foreign: list[Path] = []
    for entry in sorted(output.iterdir()):
        name = entry.name
        if name.startswith(".") or name in own_files:
            continue
        if name not in owned.top:
            foreign += _files_of(entry)
        elif name in PNG_SPLITS:
            foreign += _foreign_in_png_split(entry, owned.class_folders)
    return foreign


def _foreign_in_png_split(split_dir: Path, class_folders: frozenset[str]) -> list[Path]:
    if not split_dir.is_dir() or split_dir.is_symlink():
        return [split_dir]
    foreign: list[Path] = []
    for entry in sorted(split_dir.iterdir()):
        if entry.name not in class_folders or entry.is_symlink() or not entry.is_dir():
            foreign += _files_of(entry)
            continue
        with os.scandir(entry) as files:  # scandir: 50,000 names without a stat call each
            foreign += [
                Path(item.path)
                for item in files
                if not (PNG_NAME.fullmatch(item.name) and item.is_file(follow_symlinks=False))
            ]
    return foreign


def _files_of(entry: Path) -> list[Path]:
    """A foreign folder is named by the files it holds (the user's photos), or by itself when it holds none."""
    if entry.is_symlink() or not entry.is_dir():
        return [entry]
    return sorted(path for path in entry.rglob("*") if not path.is_dir()) or [entry]

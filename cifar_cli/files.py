"""File-system helpers shared by every stage: folders that must be writable, and atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

from cifar_cli.errors import UsageError

PROBE_BYTES = 4096  # a write this small still fails on a full disk


def ensure_writable_folder(folder: Path, probe: bool = False) -> None:
    """Create `folder` if needed; a file in its place, an unwritable folder or (with `probe`) a full disk is a
    usage error before any work starts."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file, not a folder.", hint="Pass a folder path.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if probe:
            probe_file = folder / ".write-test"
            probe_file.write_bytes(b"0" * PROBE_BYTES)
            probe_file.unlink()
    except OSError as error:
        raise UsageError(f"Cannot write to {folder}: {error.strerror or error}.") from None


def write_text_atomically(path: Path, text: str) -> None:
    """Write to a temporary sibling, then rename: readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)

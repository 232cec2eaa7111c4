"""File-system helpers shared by every stage: writable folders, free space, atomic writes and run locks.

Every file the tool writes goes through `write_atomically`: a temporary sibling, flushed to disk, then renamed over
the target, so a reader sees the old file or the new one and a failure (full disk, kill -9) never leaves half of one.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from cifar_cli.errors import CifarError, UsageError

PROBE_BYTES = 4096  # a write this small still fails on a full disk
MB = 1_000_000
LOCK_FILE = ".lock"


def ensure_writable_folder(folder: Path, probe: bool = False) -> None:
    """Create `folder` if needed; a file in its place, an unwritable folder or (with `probe`) a full disk is a
    usage error before any work starts."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file, not a folder.", hint="Pass a folder path.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if probe:
            probe_file = folder / ".write-test"
            try:
                probe_file.write_bytes(b"0" * PROBE_BYTES)
            finally:
                probe_file.unlink(missing_ok=True)
    except OSError as error:
        raise UsageError(f"Cannot write to {folder}: {error.strerror or error}.") from None


def free_bytes(folder: Path) -> int:
    """Bytes a process may still write under `folder` (its nearest existing parent)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def require_free_space(folder: Path, needed_bytes: int, what: str, hint: str | None = None) -> None:
    """Refuse long work whose output size is known before it starts, rather than failing half-way through."""
    free = free_bytes(folder)
    if free < needed_bytes:
        raise CifarError(
            f"Not enough space in {folder} for {what}: needs about {needed_bytes / MB:,.1f} MB, "
            f"{free / MB:,.1f} MB free.",
            hint=hint or "Free disk space or choose another folder.",
        )


def write_atomically(path: Path, payload: bytes, hint: str | None = None) -> None:
    """Write `payload` to a temporary sibling, flush it to disk, then rename it over `path`.

    A crash at any moment leaves the previous file or the new one; a failure (a full disk included) removes the
    temporary file and raises a CifarError that names the file, with the previous one untouched.
    """
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        require_free_space(path.parent, len(payload), path.name, hint)
        with tmp.open("wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except OSError as error:
        why = f"{_blocking_file(path)} is a file, not a folder" if _blocking_file(path) else error.strerror or error
        raise CifarError(f"Could not write {path}: {why}.", hint=hint) from None
    finally:
        with contextlib.suppress(OSError):  # e.g. no folder to remove it from: the error above says why
            tmp.unlink(missing_ok=True)


def _blocking_file(path: Path) -> Path | None:
    """The file that stands where one of `path`'s folders should be, if any."""
    return next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)


def tensor_file_bytes(state: object) -> bytes:
    """`torch.save` into memory: the size is known before anything touches the disk, and a full disk then fails
    as an OSError in a plain write (torch.save's own writer reports it as an opaque RuntimeError and leaves its
    partial file behind)."""
    import torch  # here, so that modules which never save tensors do not pay for importing torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, text.encode())


def remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries of `path` left by processes that no longer run (kill -9 during a write)."""
    with contextlib.suppress(OSError):
        for candidate in path.parent.glob(f".{path.name}.*.tmp"):
            pid_text = candidate.name[len(path.name) + 2 : -len(".tmp")]
            if pid_text.isdigit() and not process_alive(int(pid_text)):
                candidate.unlink(missing_ok=True)


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Ctrl-C (and the other stop signals: SIGTERM, SIGUSR1, SIGUSR2) waits until the block is done, then takes
    effect as it would have (a checkpoint and the note of which epoch it holds are written together). A
    Python-level handler, not a signal mask: a mask holds for one thread only, and torch's worker threads would
    take the signal. Main thread only; elsewhere the block runs as it is."""
    import signal
    import threading

    from cifar_cli.runtime.stopping import STOP_SIGNALS

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        number: signal.signal(number, lambda signum, _frame: received.append(signum)) for number in STOP_SIGNALS
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(received):  # each once, in order: handled as before the block
            signal.raise_signal(number)


@contextlib.contextmanager
def folders_removed_on_failure(*folders: Path) -> Iterator[None]:
    """Folders (and their parents) that do not exist yet and that the block creates are removed again, while
    still empty, if the block fails: a command that fails leaves no empty folders behind (a partial download,
    kept for resuming, keeps its folder)."""
    new_tops = {_topmost_missing(folder) for folder in folders} - {None}
    try:
        yield
    except BaseException:
        for top in new_tops:
            _remove_empty_tree(top)
        raise


def _topmost_missing(folder: Path) -> Path | None:
    folder = folder.absolute()
    if folder.exists():
        return None
    while not folder.parent.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def _remove_empty_tree(top: Path) -> None:
    """Remove `top` and the folders below it, deepest first, as long as they hold no file."""
    if not top.is_dir():
        return
    for folder in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()
    with contextlib.suppress(OSError):
        top.rmdir()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


@contextlib.contextmanager
def run_lock(folders: list[Path], run_name: str, hint: str | None = None) -> Iterator[None]:
    """Own a run: one process at a time. An OS file lock (flock) that the kernel releases when the owner exits,
    however it exits, so a killed run never leaves a stuck lock; the file names the owner for the error message."""
    handles = []
    try:
        for folder in folders:
            handles.append(_acquire(folder / LOCK_FILE, run_name, hint))
        yield
    finally:
        for handle in handles:
            with contextlib.suppress(OSError):
                handle.seek(0)
                handle.truncate()  # an empty file: nobody owns the run (a killed owner leaves its line behind)
            handle.close()  # closing the descriptor releases the lock


def _acquire(lock_path: Path, run_name: str, hint: str | None = None):  # noqa: ANN202 - an open binary file
    import fcntl  # POSIX only; imported here so the rest of the module works everywhere

    handle = lock_path.open("a+b")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.seek(0)
        owner = handle.read().decode(errors="replace").strip() or "another process"
        handle.close()
        if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise CifarError(f"Could not lock {lock_path}: {error.strerror or error}.") from None
        raise UsageError(
            f"Run {run_name!r} is in use by {owner} ({lock_path}).",
            hint=hint or "Wait for it to finish or stop it; or start another run with --run-name.",
        ) from None
    handle.seek(0)
    handle.truncate()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    handle.write(f"process {os.getpid()} on {socket.gethostname()} since {started}\n".encode())
    handle.flush()
    return handle

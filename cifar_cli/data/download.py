"""Fetch the CIFAR-10 archive from mirrors (http(s)://, file:// or a path), resuming and verifying it.

The bytes go to `<name>.part`; only a file whose MD5 matches is renamed to its final name, so `prepare` never
sees a partial or corrupt archive.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from cifar_cli.errors import CifarError
from cifar_cli.files import ensure_writable_folder, require_free_space

ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_BYTES = 170_498_071  # the official CIFAR-10 archive: the space a download needs when a server won't say
MAX_ARCHIVE_BYTES = 256_000_000  # well past it: a mirror that sends more is refused (an endless stream)
CHUNK_BYTES = 1 << 20
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Called with (bytes done, bytes total or None) as data arrives.
ProgressCallback = Callable[[int, int | None], None]


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    source: str
    already_present: bool
    md5: str


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_archive(
    urls: list[str],
    md5: str,
    raw_dir: Path,
    force: bool = False,
    timeout: float = 30.0,
    retries: int = 3,
    backoff_seconds: float = 1.0,
    on_progress: ProgressCallback | None = None,
    on_message: Callable[[str], None] | None = None,
    max_bytes: int = MAX_ARCHIVE_BYTES,
    archive_name: str = ARCHIVE_NAME,
) -> DownloadResult:
    """Make `raw_dir/<archive_name>` exist with the given MD5, trying each mirror in turn."""
    expected = md5.lower()
    target = raw_dir / archive_name
    say = on_message or (lambda _text: None)
    ensure_writable_folder(raw_dir)
    if target.exists() and not force:
        if md5_of(target) == expected:
            return DownloadResult(target, str(target), True, expected)
        say(f"{target} exists but its checksum is wrong; downloading it again.")
    failures: list[str] = []
    for url in urls:
        part = target.with_name(target.name + ".part")
        try:
            _fetch_with_retries(url, part, _Limits(timeout, retries, backoff_seconds, max_bytes), on_progress, say)
            _verify(part, expected, url)
        except CifarError as error:
            failures.append(f"{url}: {error.message}")
            say(f"Mirror failed: {url}: {error.message}")
            continue
        part.replace(target)
        return DownloadResult(target, url, False, expected)
    raise CifarError(
        "Could not download the CIFAR-10 archive from any mirror:\n  " + "\n  ".join(failures),
        hint="Pass a reachable mirror or a local copy with --url (http(s)://, file:// or a path) and its --md5.",
    )


def _verify(part: Path, expected: str, url: str) -> None:
    actual = md5_of(part)
    if actual != expected:
        part.unlink(missing_ok=True)
        raise CifarError(f"checksum mismatch (md5 {actual}, expected {expected}); the file was deleted")


@dataclass(frozen=True)
class _Limits:
    timeout: float  # seconds without a byte
    retries: int
    backoff_seconds: float
    max_bytes: int


def _fetch_with_retries(
    url: str, part: Path, limits: _Limits, on_progress: ProgressCallback | None, say: Callable[[str], None]
) -> None:
    local = _local_path(url)
    if local is not None:
        _copy_local(local, part, limits.max_bytes, on_progress)
        return
    for attempt in range(limits.retries + 1):
        try:
            _fetch_http(url, part, limits, on_progress)
            return
        except _PermanentError as error:
            raise CifarError(str(error)) from None
        except OSError as error:
            if error.errno in DISK_FULL:
                part.unlink(missing_ok=True)
                raise CifarError(f"could not write {part}: {error.strerror}; the partial file was deleted") from None
            reason = getattr(error, "reason", None) or error
            if attempt == limits.retries:
                raise CifarError(f"gave up after {limits.retries + 1} attempts ({reason})") from None
            delay = limits.backoff_seconds * 2**attempt
            say(f"Attempt {attempt + 1} failed ({reason}); retrying in {delay:.1f} s, resuming where it stopped.")
            time.sleep(delay)


def _local_path(url: str) -> Path | None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme and len(parsed.scheme) > 1:
        raise CifarError(f"unsupported URL scheme {parsed.scheme!r}; use http(s)://, file:// or a path")
    return Path(url)


def _copy_local(source: Path, part: Path, max_bytes: int, on_progress: ProgressCallback | None) -> None:
    if not source.is_file():
        raise CifarError(f"no such file: {source}")
    total = source.stat().st_size
    _check_size(total, max_bytes)
    require_free_space(
        part.parent, total, f"a copy of {source.name}", hint="Free disk space or choose another --raw-dir."
    )
    done = 0
    try:
        with source.open("rb") as reader, part.open("wb") as writer:
            while chunk := reader.read(CHUNK_BYTES):
                writer.write(chunk)
                done += len(chunk)
                if on_progress:
                    on_progress(done, total)
    except OSError as error:
        part.unlink(missing_ok=True)
        raise CifarError(f"could not copy {source} ({error.strerror or error})") from None


class _PermanentError(Exception):
    """A failure that retrying will not change: HTTP 404/403, a file larger than any archive."""


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise _PermanentError(
            f"the mirror offers {size:,} bytes, more than the {max_bytes:,} an archive may have "
            "(data.max_archive_mb); refused"
        )


def _fetch_http(url: str, part: Path, limits: _Limits, on_progress: ProgressCallback | None) -> None:
    """Append to `part` from where it stopped, using a Range request; raises OSError-family errors to retry."""
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "cifar-cli"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    try:
        response = urllib.request.urlopen(request, timeout=limits.timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and start:
            # The part file is already complete (or longer than the file): start over next time.
            part.unlink(missing_ok=True)
            raise OSError("server refused the resume range; restarting from zero") from None
        if error.code in (408, 429) or error.code >= 500:
            raise OSError(f"HTTP {error.code} {error.reason}") from None
        raise _PermanentError(f"HTTP {error.code} {error.reason}") from None
    with response:
        resumed = response.status == 206
        if start and not resumed:
            start = 0  # the server ignored Range: take the whole body again
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        _check_size(total or 0, limits.max_bytes)
        require_free_space(
            part.parent,
            (total or ARCHIVE_BYTES) - start,
            "the download",
            hint="Free disk space or choose another --raw-dir.",
        )
        _stream(response, part, start, total, limits.max_bytes, "ab" if resumed else "wb", on_progress)


def _stream(
    response: http.client.HTTPResponse,
    part: Path,
    start: int,
    total: int | None,
    max_bytes: int,
    mode: str,
    on_progress: ProgressCallback | None,
) -> None:
    done = start
    try:
        with part.open(mode) as writer:
            while chunk := response.read(CHUNK_BYTES):
                done += len(chunk)
                if done > max_bytes:
                    raise _PermanentError(
                        f"the mirror sent more than {max_bytes:,} bytes, more than an archive may have "
                        "(data.max_archive_mb); stopped and deleted the partial file"
                    )
                writer.write(chunk)
                if on_progress:
                    on_progress(done, total)
    except _PermanentError:
        part.unlink(missing_ok=True)
        raise
    except http.client.HTTPException as error:  # IncompleteRead and friends: a broken transfer, worth a retry
        raise OSError(f"transfer broke off ({type(error).__name__})") from None
    if total is not None and done < total:
        raise OSError(f"connection closed after {done} of {total} bytes")

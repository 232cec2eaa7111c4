from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest

from cifar_cli.data.download import ARCHIVE_NAME, download_archive
from cifar_cli.errors import CifarError
from tests.http_server import ServerState, serve

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


def fetch(url: str, raw: Path, md5: str = PAYLOAD_MD5, **kwargs) -> object:
    return download_archive([url], md5, raw, backoff_seconds=0.01, timeout=kwargs.pop("timeout", 5), **kwargs)


def test_downloads_verifies_and_renames(tmp_path: Path) -> None:
    state = ServerState(PAYLOAD)
    with serve(state) as base:
        result = fetch(f"{base}/{ARCHIVE_NAME}", tmp_path)
    assert result.path.read_bytes() == PAYLOAD
    assert not list(tmp_path.glob("*.part"))
    assert state.requests == [None]


def test_resumes_with_range_after_a_dropped_connection(tmp_path: Path) -> None:
    state = ServerState(PAYLOAD, mode="drop_once")
    with serve(state) as base:
        result = fetch(f"{base}/{ARCHIVE_NAME}", tmp_path)
    assert result.path.read_bytes() == PAYLOAD
    assert state.requests[0] is None
    assert state.requests[1] == f"bytes={len(PAYLOAD) // 2}-"  # continued where the first attempt stopped


def test_resumes_a_part_file_left_by_an_earlier_run(tmp_path: Path) -> None:
    (tmp_path / f"{ARCHIVE_NAME}.part").write_bytes(PAYLOAD[:1000])
    state = ServerState(PAYLOAD)
    with serve(state) as base:
        fetch(f"{base}/{ARCHIVE_NAME}", tmp_path)
    assert state.requests == ["bytes=1000-"]
    assert (tmp_path / ARCHIVE_NAME).read_bytes() == PAYLOAD


def test_wrong_bytes_fail_and_leave_nothing_behind(tmp_path: Path) -> None:
    state = ServerState(b"not the archive" * 1000)
    with serve(state) as base, pytest.raises(CifarError, match="checksum mismatch"):
        fetch(f"{base}/{ARCHIVE_NAME}", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_dead_port_fails_clearly(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(CifarError) as error:
        fetch(f"http://127.0.0.1:{port}/{ARCHIVE_NAME}", tmp_path, retries=1)
    assert f"127.0.0.1:{port}" in error.value.message and "refused" in error.value.message.lower()
    assert error.value.hint and "--url" in error.value.hint
    assert not (tmp_path / ARCHIVE_NAME).exists()


def test_stalled_server_times_out_retries_then_fails(tmp_path: Path) -> None:
    state = ServerState(PAYLOAD, mode="stall", stall_seconds=3)
    with serve(state) as base, pytest.raises(CifarError, match="timed out"):
        fetch(f"{base}/{ARCHIVE_NAME}", tmp_path, retries=1, timeout=0.5)
    assert len(state.requests) == 2  # the first try and one retry
    assert not (tmp_path / ARCHIVE_NAME).exists()


def test_http_404_is_not_retried_and_next_mirror_is_used(tmp_path: Path) -> None:
    state = ServerState(PAYLOAD)
    with serve(state) as base:
        result = download_archive(
            [f"{base}/missing.tar.gz", f"{base}/{ARCHIVE_NAME}"], PAYLOAD_MD5, tmp_path, backoff_seconds=0.01
        )
    assert result.source.endswith(ARCHIVE_NAME)
    assert state.requests == [None]  # the 404 is not recorded as a download attempt and not retried


def test_local_path_and_file_url(tmp_path: Path) -> None:
    source = tmp_path / "mirror.tar.gz"
    source.write_bytes(PAYLOAD)
    for url, folder in ((str(source), "a"), (source.as_uri(), "b")):
        result = fetch(url, tmp_path / folder)
        assert result.path.read_bytes() == PAYLOAD


def test_second_run_does_nothing(tmp_path: Path) -> None:
    source = tmp_path / "mirror.tar.gz"
    source.write_bytes(PAYLOAD)
    fetch(str(source), tmp_path / "raw")
    source.unlink()  # a second download would now fail
    assert fetch(str(source), tmp_path / "raw").already_present


def test_missing_local_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(CifarError, match="no such file"):
        fetch(str(tmp_path / "nope.tar.gz"), tmp_path / "raw")


def test_http_416_on_a_resume_restarts_from_zero(tmp_path: Path) -> None:
    # A .part as long as the file (an earlier run died before renaming it): the server answers 416 to the range.
    (tmp_path / f"{ARCHIVE_NAME}.part").write_bytes(PAYLOAD)
    state = ServerState(PAYLOAD)
    with serve(state) as base:
        result = fetch(f"{base}/{ARCHIVE_NAME}", tmp_path)
    assert result.path.read_bytes() == PAYLOAD
    assert state.requests == [f"bytes={len(PAYLOAD)}-", None]


def test_server_that_ignores_range_sends_the_whole_file_again(tmp_path: Path) -> None:
    (tmp_path / f"{ARCHIVE_NAME}.part").write_bytes(PAYLOAD[:1000])
    state = ServerState(PAYLOAD, mode="ignore_range")
    with serve(state) as base:
        result = fetch(f"{base}/{ARCHIVE_NAME}", tmp_path)
    assert result.path.read_bytes() == PAYLOAD  # not the first 1,000 bytes twice
    assert state.requests == ["bytes=1000-"]


def test_server_error_is_retried(tmp_path: Path) -> None:
    state = ServerState(PAYLOAD, mode="error_once")
    messages: list[str] = []
    with serve(state) as base:
        result = fetch(f"{base}/{ARCHIVE_NAME}", tmp_path, on_message=messages.append)
    assert result.path.read_bytes() == PAYLOAD
    assert len(state.requests) == 2 and "HTTP 503" in messages[0]


def test_content_length_longer_than_the_body_is_retried_then_refused(tmp_path: Path) -> None:
    state = ServerState(PAYLOAD, mode="long_length")
    with serve(state) as base, pytest.raises(CifarError, match="gave up after 2 attempts"):
        fetch(f"{base}/{ARCHIVE_NAME}", tmp_path, retries=1)
    assert len(state.requests) == 2


def test_content_length_shorter_than_the_file_fails_the_checksum(tmp_path: Path) -> None:
    state = ServerState(PAYLOAD, mode="short_length")
    with serve(state) as base, pytest.raises(CifarError, match="checksum mismatch"):
        fetch(f"{base}/{ARCHIVE_NAME}", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_endless_stream_is_stopped_past_the_size_limit(tmp_path: Path) -> None:
    state = ServerState(PAYLOAD, mode="endless")
    with serve(state) as base, pytest.raises(CifarError, match="more than 2,000,000 bytes"):
        fetch(f"{base}/{ARCHIVE_NAME}", tmp_path, max_bytes=2_000_000)
    assert list(tmp_path.iterdir()) == []  # the partial file is gone
    assert len(state.requests) == 1  # not retried


def test_offer_larger_than_any_archive_is_refused_before_writing(tmp_path: Path) -> None:
    state = ServerState(PAYLOAD)
    with serve(state) as base, pytest.raises(CifarError, match="offers 1,048,576 bytes"):
        fetch(f"{base}/{ARCHIVE_NAME}", tmp_path, max_bytes=100_000)
    assert list(tmp_path.iterdir()) == []

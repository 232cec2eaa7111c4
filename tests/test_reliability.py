"""Faults done for real where the machine allows: full disks (a small tmpfs, as root), alias bombs, damaged run
folders, endless mirrors through the CLI. Each ends in a short message, a non-zero exit and no temporary file."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cifar_cli import files
from cifar_cli.checkpoint import save_checkpoint
from cifar_cli.errors import CifarError
from tests.conftest import flat, run_cli, tiny_settings
from tests.http_server import ServerState, serve


def _mount_tmpfs(folder: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `folder`: a real full disk. Needs root and mount rights, else the test skips."""
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        for _ in range(20):  # a file handle closing late makes umount busy for a moment
            if subprocess.run(["umount", str(folder)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


@pytest.fixture(params=["tmpfs", "reported"])
def small_disk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """small_disk(folder, bytes): a real tmpfs where mounting is allowed; and on every machine a folder whose free
    space `shutil.disk_usage` reports as `bytes`, so that the refusals run even where mounts are not allowed."""

    @contextlib.contextmanager
    def make(folder: Path, size: int) -> Iterator[Path]:
        if request.param == "tmpfs":
            yield from _mount_tmpfs(folder, size)
            return
        folder.mkdir(parents=True, exist_ok=True)
        real = shutil.disk_usage

        def reported(path: str | os.PathLike) -> object:
            usage, where = real(path), Path(path).resolve()
            if where != folder.resolve() and folder.resolve() not in where.parents:
                return usage
            used = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())  # as a tmpfs of `size` counts
            return usage._replace(free=max(0, min(usage.free, size - used)))

        monkeypatch.setattr(files.shutil, "disk_usage", reported)
        yield folder

    return make


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith(".extract-"))


def _squash(text: str) -> str:
    """Without white space and panel borders: long paths fold across the error panel's lines."""
    return re.sub(r"[\s│╭╮╰╯─]", "", text)


def _one_screen(output: str) -> None:
    """A refusal that fits on one screen (`run_cli` already fails the test on a crash)."""
    assert len(output.splitlines()) < 15, output


def test_prepare_onto_a_full_disk_refuses_before_writing(tmp_path: Path, tiny_archive: Path, small_disk) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(tiny_archive, raw / tiny_archive.name)
    with small_disk(tmp_path / "disk", 64 * 1024) as disk:
        result = run_cli("prepare", "--raw-dir", str(raw), "--processed-dir", str(disk / "data"))
        assert result.exit_code == 1, result.output
        assert "Not enough space" in flat(result.output) and "prepared data" in flat(result.output)
        _one_screen(result.output)
        assert list(disk.iterdir()) == []  # no cache, no PNG folder, no .tmp: not even the folder it made


def test_extracting_onto_a_full_disk_leaves_nothing(tmp_path: Path, tiny_archive: Path, small_disk) -> None:
    room = tiny_archive.stat().st_size + 64 * 1024  # the archive fits, its extracted batches do not
    with small_disk(tmp_path / "disk", room) as disk:
        shutil.copy(tiny_archive, disk / tiny_archive.name)
        result = run_cli("prepare", "--raw-dir", str(disk), "--processed-dir", str(tmp_path / "out"))
        assert result.exit_code == 1, result.output
        assert "Not enough space" in flat(result.output) and "extracted" in flat(result.output)
        _one_screen(result.output)
        assert sorted(p.name for p in disk.iterdir()) == [tiny_archive.name]


def test_download_onto_a_full_disk_refuses_before_copying(tmp_path: Path, tiny_archive: Path, small_disk) -> None:
    with small_disk(tmp_path / "disk", 16 * 1024) as disk:
        result = run_cli("download", "--url", str(tiny_archive), "--raw-dir", str(disk))
        assert result.exit_code == 1, result.output
        assert "Not enough space" in flat(result.output)
        _one_screen(result.output)
        assert list(disk.iterdir()) == []


def test_training_refuses_before_the_first_epoch_when_checkpoints_cannot_fit(
    tmp_path: Path, prepared_dir: Path, small_disk
) -> None:
    with small_disk(tmp_path / "disk", 64 * 1024) as disk:
        from cifar_cli.train.run import train

        with pytest.raises(CifarError, match=r"Not enough space .* checkpoints"):
            train(tiny_settings(tmp_path, prepared_dir, f"log.checkpoint_dir={disk}"))
        assert not (tmp_path / "runs" / "tiny" / "history.json").exists()  # no epoch was trained
        assert _leftovers(disk) == []


def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with contextlib.contextmanager(_mount_tmpfs)(tmp_path / "disk", 256 * 1024) as disk:  # the kernel's ENOSPC
        path = disk / "last.pth"
        save_checkpoint({"epoch": 1, "weights": torch.arange(10)}, path)
        # The free-space check would refuse first; switch it off so the kernel's own ENOSPC is what happens.
        monkeypatch.setattr(files, "require_free_space", lambda *args, **kwargs: None)
        with pytest.raises(CifarError, match="No space left on device"):
            save_checkpoint({"epoch": 2, "weights": torch.zeros(1_000_000)}, path)
        state = torch.load(path, weights_only=True)
        assert state["epoch"] == 1 and torch.equal(state["weights"], torch.arange(10))
        assert sorted(p.name for p in disk.iterdir()) == ["last.pth"]


def test_torch_save_errors_of_a_full_disk_are_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Where no tmpfs can be mounted: the write fails the way a full disk fails it, in the middle of the file.
    path = tmp_path / "last.pth"
    save_checkpoint({"epoch": 1}, path)

    def full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(CifarError, match=r"Could not write .*last.pth: No space left on device"):
        save_checkpoint({"epoch": 2}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".last.pth.{dead.pid}.tmp"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / ".last.pth.1.tmp"  # a writer that still runs (process 1 always does) keeps its file
    live.write_bytes(b"being written")
    save_checkpoint({"epoch": 1}, tmp_path / "last.pth")
    assert not stale.exists() and live.exists()


def test_endless_mirror_through_the_cli(tmp_path: Path) -> None:
    state = ServerState(b"", mode="endless")
    with serve(state) as base:
        result = run_cli("download", "--url", f"{base}/cifar-10-python.tar.gz", "--md5", "0" * 32, "--raw-dir", str(tmp_path / "raw"),
             "--set", "data.max_archive_mb=3",
        )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "more than 3,000,000 bytes" in result.output
    _one_screen(result.output)
    assert list((tmp_path / "raw").iterdir()) == []


BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 10) if previous else ', '.join(['lol'] * 10)}]\n"
    for previous, name in zip([None, *"abcdefgh"], "abcdefghi")
)


def test_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert len(BOMB) < 500  # nine levels of ten: a billion values once expanded
    result = run_cli("config", "show", "--config", str(bomb))
    assert result.exit_code == 2, result.output
    assert "expands to more than 10,000 values" in result.output
    _one_screen(result.output)


@pytest.mark.parametrize(
    ("text", "message"),
    [("a: &a [*a]\n", "refers to the node that contains it"), ("x: " + "[" * 3000 + "]" * 3000, "nested too deeply")],
)
def test_self_referencing_and_deep_yaml_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run_cli("config", "show", "--config", str(path))
    assert result.exit_code == 2 and message in result.output, result.output
    _one_screen(result.output)


def test_yaml_aliases_within_the_limit_still_work(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("optim: &o {lr: 0.05}\n")  # an anchor a user might write; not a bomb
    result = run_cli("config", "show", "--config", str(path))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("content", ["{not json", '{"epoch": 1}', '[{"epoch": "one", "lr": 0.1}]', "\xff\xfe"])
def test_damaged_history_is_a_clear_error_naming_the_file(tmp_path: Path, content: str) -> None:
    run = tmp_path / "runs" / "damaged"
    run.mkdir(parents=True)
    (run / "history.json").write_bytes(content.encode("latin-1"))
    result = run_cli("plot", str(run))
    assert result.exit_code == 2, result.output
    assert _squash("history.json is damaged") in _squash(result.output)
    _one_screen(result.output)


def test_history_written_by_training_reads_back(tmp_path: Path, prepared_dir: Path) -> None:
    from cifar_cli.train.run import train
    from cifar_cli.train.tracking import read_history

    result = train(tiny_settings(tmp_path, prepared_dir, "train.epochs=1"))
    assert [r["epoch"] for r in read_history(result.run_dir)] == [1]
    assert isinstance(json.loads((result.run_dir / "history.json").read_text())[0]["lr"], float)

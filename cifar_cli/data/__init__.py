"""Data: download, safe archive reading, preparation into PNG folders and a tensor cache, in-memory loading."""

from __future__ import annotations

from collections.abc import Callable

from cifar_cli.data.download import download_archive
from cifar_cli.data.prepare import CACHE_FILE, prepare_dataset
from cifar_cli.files import ensure_writable_folder
from cifar_cli.settings import DataSettings


def ensure_prepared(data: DataSettings, say: Callable[[str], None] = lambda _text: None) -> None:
    """Download and prepare exactly as `cifar download` and `cifar prepare` would, when the cache is missing."""
    if (data.processed_dir / CACHE_FILE).is_file():
        return
    ensure_writable_folder(data.processed_dir)  # a bad path fails before a download, not after
    say(f"No prepared data in {data.processed_dir}: downloading and preparing it first.")
    result = download_archive(
        data.urls,
        data.md5,
        data.raw_data_dir,
        timeout=data.download_timeout,
        retries=data.download_retries,
        max_bytes=int(data.max_archive_mb * 1_000_000),
        on_message=say,
    )
    say(f"Archive ready: {result.path}")
    prepare_dataset(data.raw_data_dir, data.processed_dir, write_png=data.write_png)
    say(f"Prepared data in {data.processed_dir}")

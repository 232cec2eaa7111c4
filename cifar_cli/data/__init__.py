"""Data: download, safe archive reading, preparation into PNG folders and a tensor cache, in-memory loading."""

from __future__ import annotations

from collections.abc import Callable

from cifar_cli.config.sections import DataSettings
from cifar_cli.data.archive import archive_layout
from cifar_cli.data.download import DownloadResult, download_archive
from cifar_cli.data.parquet import prepare_parquet
from cifar_cli.data.prepare import (
    CACHE_FILE,
    PrepareResult,
    ProgressCallback,
    prepare_csv,
    prepare_dataset,
    prepare_folder,
    read_manifest,
)
from cifar_cli.errors import UsageError
from cifar_cli.files import ensure_writable_folder, folders_removed_on_failure


def download_for(
    data: DataSettings,
    force: bool = False,
    on_progress: Callable[[int, int | None], None] | None = None,
    on_message: Callable[[str], None] | None = None,
) -> DownloadResult:
    """The settings' data set's archive (its official URL and MD5 unless mirrors or an MD5 are given)."""
    layout = archive_layout(data.archive_dataset(), data.label_set)
    return download_archive(
        data.archive_urls(),
        data.archive_md5(),
        data.raw_data_dir,
        force=force,
        timeout=data.download_timeout,
        retries=data.download_retries,
        max_bytes=int(data.max_archive_mb * 1_000_000),
        on_progress=on_progress,
        on_message=on_message,
        archive_name=layout.archive_name,
    )


def prepare_for(data: DataSettings, on_progress: ProgressCallback | None = None) -> PrepareResult:
    """`cifar prepare` for the settings: the CSV list at `data.csv_file`, the parquet files at `data.parquet`, the
    folder at `data.folder`, or the data set's downloaded archive. An output folder it made is removed again, while
    still empty, where the preparation is refused (output inside the images' folder, say)."""
    with folders_removed_on_failure(data.processed_dir):
        return _prepare_source(data, on_progress)


def _prepare_source(data: DataSettings, on_progress: ProgressCallback | None) -> PrepareResult:
    if data.dataset == "folder":
        # Where the images come from differs; how they are read and written does not.
        how = (
            data.processed_dir,
            data.write_png,
            on_progress,
            data.image_size,
            data.test_fraction,
            data.skip_bad_images,
        )
        if data.csv_file is not None:
            return prepare_csv(data.csv_file, *how, data.csv_root)
        if data.parquet is not None:
            columns = (data.image_column, data.label_column, data.split_column)
            return prepare_parquet(data.parquet, *how[:4], data.skip_bad_images, columns, data.parquet_validation)
        if data.folder is None:
            raise UsageError(
                "data.dataset is folder but no folder, CSV list or parquet files are given.",
                hint="Run `cifar prepare --from-folder DIR`, `--from-csv FILE` or `--from-parquet PATH`.",
            )
        return prepare_folder(data.folder, *how)
    if data.image_size != 32:
        raise UsageError(
            f"data.image_size={data.image_size}: the CIFAR archives hold 32 x 32 images.",
            hint="Leave --image-size at 32, or prepare a folder of larger images with --from-folder.",
        )
    return prepare_dataset(
        data.raw_data_dir, data.processed_dir, data.write_png, on_progress, data.archive_dataset(), data.label_set
    )


def ensure_prepared(data: DataSettings, say: Callable[[str], None] = lambda _text: None) -> None:
    """Download and prepare exactly as `cifar download` and `cifar prepare` would, when the cache is missing; refuse
    prepared data of another data set than the settings name."""
    # The manifest is written last: a cache without one is a preparation that did not finish.
    manifest = read_manifest(data.processed_dir)
    if (data.processed_dir / CACHE_FILE).is_file() and manifest is not None:
        check_prepared_matches(data, manifest)
        return
    with folders_removed_on_failure(data.processed_dir, data.raw_data_dir):
        ensure_writable_folder(data.processed_dir)  # a bad path fails before a download, not after
        if data.dataset != "folder" or (data.folder is None and data.csv_file is None and data.parquet is None):
            say(f"No prepared data in {data.processed_dir}: downloading and preparing it first.")
            result = download_for(data, on_message=say)
            say(f"Archive ready: {result.path}")
        prepare_for(data)
    say(f"Prepared data in {data.processed_dir}")


def check_prepared_matches(data: DataSettings, manifest: dict) -> None:
    """`--dataset cifar100` over CIFAR-10 data (or the other way round) is an error, not a silent swap."""
    prepared = manifest.get("dataset", "cifar10")
    asked = data.dataset
    label_set = manifest.get("label_set", "fine")
    if asked is not None and (asked != prepared or (asked == "cifar100" and data.label_set != label_set)):
        what = prepared + (f" ({label_set} labels)" if prepared == "cifar100" else "")
        raise UsageError(
            f"{data.processed_dir} holds {what} data, but the settings ask for {asked}"
            + (f" ({data.label_set} labels)" if asked == "cifar100" else "")
            + ".",
            hint="Prepare that data set into another --processed-dir (or leave --dataset out to use what is there).",
        )


def adopt_prepared(data: DataSettings) -> DataSettings:
    """The settings with the prepared data's identity filled in (data set, label set, image size, and a folder's
    content checksum as `md5`), so that runs on different data get different names and a resume cannot mix them."""
    manifest = read_manifest(data.processed_dir)
    if manifest is None or not (data.processed_dir / CACHE_FILE).is_file():
        return data
    check_prepared_matches(data, manifest)
    dataset = manifest.get("dataset", "cifar10")
    update = {"dataset": dataset, "image_size": int(manifest.get("image_size", 32))}
    if dataset == "cifar100":
        update["label_set"] = manifest.get("label_set", "fine")
    if dataset == "folder":
        update["md5"] = manifest.get("source_md5")
    return data.model_copy(update=update)

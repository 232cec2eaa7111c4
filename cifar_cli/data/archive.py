"""Open the CIFAR-10 and CIFAR-100 python archives safely: checked extraction and a restricted unpickler.

The batches are Python-2 pickles. A bare `pickle.load` would run any callable a tampered file names, so the
unpickler below resolves only the few globals that numpy array reconstruction needs.
"""

from __future__ import annotations

import errno
import io
import pickle
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifar_cli.errors import CifarError, UsageError
from cifar_cli.files import require_free_space

BATCH_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
NUM_CLASSES = 10
IMAGE_VALUES = 3 * 32 * 32  # one row of `data`: 1024 red, 1024 green, 1024 blue, row-major 32 x 32


def _reconstruct_function():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _codecs_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python-3 protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"); only that encoding is allowed.
    if encoding != "latin1" and encoding != "latin-1":
        raise pickle.UnpicklingError(f"refused encoding {encoding!r}")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_function(),
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_function(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class UnsafePickleError(UsageError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's own signature
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"Refused to unpickle {module}.{name}: CIFAR batches only contain numpy arrays.",
                hint="The archive is not an authentic CIFAR file; download it again from a trusted source.",
            ) from None


def safe_unpickle(payload: bytes, origin: str) -> dict[str, object]:
    """Load one batch pickle (Python-2 or 3 style) with str keys; only numpy array globals may be resolved."""
    try:
        data = _RestrictedUnpickler(io.BytesIO(payload), encoding="bytes").load()
    except UnsafePickleError:
        raise
    except Exception as error:  # a corrupt pickle can raise almost anything
        raise CifarError(f"{origin} is not a readable CIFAR batch ({type(error).__name__}: {error}).") from None
    if not isinstance(data, dict):
        raise CifarError(f"{origin} holds a {type(data).__name__}, not the dict a CIFAR batch holds.")
    return {_text(key): value for key, value in data.items()}


def _text(value: object) -> object:
    return value.decode("latin1") if isinstance(value, bytes) else value


@dataclass(frozen=True)
class ArchiveLayout:
    """Where an official archive keeps its batches, and under which pickle keys its labels and class names are."""

    archive_name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    names_key: str
    labels_key: str
    num_classes: int
    title: str


CIFAR10_LAYOUT = ArchiveLayout(
    "cifar-10-python.tar.gz",
    BATCH_FOLDER,
    tuple(TRAIN_BATCHES),
    (TEST_BATCH,),
    META_FILE,
    "label_names",
    "labels",
    NUM_CLASSES,
    "CIFAR-10",
)


def archive_layout(dataset: str, label_set: str = "fine") -> ArchiveLayout:
    """cifar10, or cifar100 with its 100 fine or 20 coarse (superclass) labels."""
    if dataset == "cifar10":
        return CIFAR10_LAYOUT
    return ArchiveLayout(
        "cifar-100-python.tar.gz",
        "cifar-100-python",
        ("train",),
        ("test",),
        "meta",
        f"{label_set}_label_names",
        f"{label_set}_labels",
        100 if label_set == "fine" else 20,
        "CIFAR-100",
    )


@dataclass(frozen=True)
class Split:
    """Images as uint8 N x 3 x 32 x 32 and labels as int64 N."""

    images: np.ndarray
    labels: np.ndarray


def safe_extract(archive: Path, target: Path, folder: str = BATCH_FOLDER) -> Path:
    """Extract `archive` below `target`, refusing links, devices and members that would land outside it.

    Extracts into a temporary sibling folder and swaps it in, so a failure (a full disk) leaves nothing half-written.
    """
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=root)).resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            if not members:
                raise UsageError(f"{archive} is an empty archive.")
            for member in members:
                _check_member(member, staging)
            require_free_space(
                root,
                sum(member.size for member in members),
                f"the extracted {archive.name}",
                hint="Free disk space or choose another --raw-dir.",
            )
            tar.extractall(staging, members=members, filter="data")
        _swap_in(staging / folder, root / folder)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS):
            raise CifarError(f"Could not extract {archive} into {root}: {error.strerror}.") from None
        raise _corrupt(archive, error) from None
    except (tarfile.TarError, EOFError, zlib.error) as error:
        raise _corrupt(archive, error) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root / folder


def _swap_in(extracted: Path, destination: Path) -> None:
    if not extracted.is_dir():
        return  # read_class_names names the missing folder
    if destination.exists():
        shutil.rmtree(destination)
    extracted.replace(destination)


def _corrupt(archive: Path, error: BaseException) -> CifarError:
    return CifarError(
        f"{archive} is truncated or corrupt ({type(error).__name__}: {error}).",
        hint="Delete it and run `cifar download` again.",
    )


def _check_member(member: tarfile.TarInfo, root: Path) -> None:
    if member.issym() or member.islnk():
        raise UsageError(f"Refused archive member {member.name!r}: links are not allowed.")
    if member.isdev() or member.isfifo():
        raise UsageError(f"Refused archive member {member.name!r}: devices and pipes are not allowed.")
    destination = (root / member.name).resolve()
    if destination != root and root not in destination.parents:
        raise UsageError(
            f"Refused archive member {member.name!r}: it would be written outside the folder it is extracted to."
        )


def read_class_names(batch_folder: Path, layout: ArchiveLayout = CIFAR10_LAYOUT) -> list[str]:
    meta = safe_unpickle(_read(batch_folder / layout.meta_file), layout.meta_file)
    names = [_text(name) for name in meta.get(layout.names_key) or []]
    if len(names) != layout.num_classes:
        raise CifarError(
            f"{layout.meta_file} lists {len(names)} names under {layout.names_key!r}; "
            f"{layout.title} has {layout.num_classes}."
        )
    return [str(name) for name in names]


def read_split(
    batch_folder: Path, batch_names: list[str] | tuple[str, ...], layout: ArchiveLayout = CIFAR10_LAYOUT
) -> Split:
    parts = [_read_batch(batch_folder / name, layout) for name in batch_names]
    return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise UsageError(
            f"The archive has no {path.name} (expected {path}).", hint="The archive is incomplete; download it again."
        )
    return path.read_bytes()


def _read_batch(path: Path, layout: ArchiveLayout) -> Split:
    batch = safe_unpickle(_read(path), path.name)
    data, labels = batch.get("data"), batch.get(layout.labels_key)
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != IMAGE_VALUES:
        shape = getattr(data, "shape", None)
        raise UsageError(f"{path.name}: `data` must be an N x {IMAGE_VALUES} array, got shape {shape}.")
    if data.dtype != np.uint8:
        raise UsageError(f"{path.name}: `data` must be uint8, got {data.dtype}.")
    label_array = np.asarray(labels, dtype=np.int64) if labels is not None else np.empty(0, np.int64)
    if label_array.ndim != 1 or len(label_array) != len(data):
        raise UsageError(f"{path.name}: {len(label_array)} labels for {len(data)} images.")
    if len(label_array) and (label_array.min() < 0 or label_array.max() >= layout.num_classes):
        bad = label_array[(label_array < 0) | (label_array >= layout.num_classes)][0]
        raise UsageError(f"{path.name}: label {bad} is out of range 0..{layout.num_classes - 1}.")
    return Split(data.reshape(-1, 3, 32, 32), label_array)

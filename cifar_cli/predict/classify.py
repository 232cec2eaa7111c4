"""Classifying image files people give us (`cifar predict`): files and folders, in batches, with the probabilities
a trained model (or an export) gives them, calibrated by the checkpoint's temperature where it has one.

An unreadable file is skipped and listed, never fatal: one damaged file among 10,000 must not cost the other 9,999.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cifar_cli.data.folder import IMAGE_SUFFIXES, READ_THREADS
from cifar_cli.data.images import ImageError, load_image
from cifar_cli.data.loader import normalize
from cifar_cli.errors import UsageError
from cifar_cli.predict.exported_model import EXPORTED_SUFFIXES, fixed_batch, load_exported, run_batches
from cifar_cli.predict.inference import LoadedModel, load_model, tta_logits
from cifar_cli.runtime.device import resolve_device, resolve_precision

ProgressCallback = Callable[[int, int], None]  # (files done, total)


@dataclass
class Classifier:
    """A checkpoint or an export, ready to score batches of uint8 N x 3 x S x S images."""

    class_names: list[str]
    image_size: int
    temperature: float  # logits are divided by it before the softmax (1: uncalibrated)
    scores: Callable[[torch.Tensor], torch.Tensor]  # uint8 images -> float32 logits on the CPU
    loaded: LoadedModel | None = None  # the model itself (checkpoints only): what Grad-CAM needs

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.scores(images) / self.temperature, dim=1)


def stored_temperature(source: dict[str, Any]) -> float:
    """The temperature a checkpoint or an export's contract stores (`cifar calibrate`), else 1."""
    stored = source.get("temperature")
    return float(stored["value"]) if isinstance(stored, dict) and "value" in stored else 1.0


def load_classifier(checkpoint: Path, device_name: str = "auto") -> Classifier:
    if checkpoint.suffix in EXPORTED_SUFFIXES:
        exported = load_exported(checkpoint)
        contract = exported.contract

        def run_export(images: torch.Tensor) -> torch.Tensor:
            return run_batches(exported.run, images.float() / 255, fixed_batch(contract))

        size = int(contract["input"]["shape"][-1])
        return Classifier(list(contract["class_names"]), size, stored_temperature(contract), run_export)
    device = resolve_device(device_name)
    loaded = load_model(checkpoint, device)
    precision = resolve_precision(loaded.train_settings.precision, device)
    level = loaded.train_settings.tta_level()

    @torch.no_grad()
    def run_model(images: torch.Tensor) -> torch.Tensor:
        dtype = precision.autocast_dtype or torch.float32
        batch = normalize(images.to(device), dtype, loaded.train_settings.channels_last, loaded.spec)
        with precision.autocast(device):
            return tta_logits(loaded.model, batch, level).float().cpu()

    return Classifier(
        list(loaded.spec.class_names), loaded.spec.image_size, stored_temperature(loaded.state), run_model, loaded
    )


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given (tried whatever their suffix), and each folder's image files, recursively and sorted; a
    folder without one image, or a path that does not exist, is an error."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
            )
            if not found:
                raise UsageError(
                    f"{path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}, searched recursively)."
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"No such file or folder: {path}")
    return files


@dataclass
class Classified:
    rows: list[dict[str, Any]]  # per readable image: {"image": path, "top": [{"class", "probability"}, ...]}
    skipped: list[tuple[str, str]]  # (path, why) of the files that could not be read


def classify_files(
    classifier: Classifier,
    files: list[Path],
    top_k: int = 3,
    batch_size: int = 256,
    on_progress: ProgressCallback = lambda _done, _total: None,
    on_batch: Callable[[list[Path], torch.Tensor, torch.Tensor], None] | None = None,
) -> Classified:
    """Top-k classes of each file, `batch_size` files at a time (decoded on several threads); `on_batch(paths,
    uint8 images, probabilities)` sees each batch (for `--explain`)."""
    result = Classified([], [])
    done = 0
    for paths, images, skipped in _decoded_batches(files, classifier.image_size, batch_size):
        result.skipped += skipped
        if paths:
            probabilities = classifier.probabilities(images)
            result.rows += top_classes(paths, probabilities, classifier.class_names, top_k)
            if on_batch is not None:
                on_batch(paths, images, probabilities)
        done += len(paths) + len(skipped)
        on_progress(done, len(files))
    return result


def top_classes(
    paths: list[Path], probabilities: torch.Tensor, class_names: list[str], top_k: int
) -> list[dict[str, Any]]:
    # A stable sort, so that exact ties (bf16 logits have them) go to the lower class index, as argmax (and so
    # `cifar evaluate`) decides them; topk's order among ties is unspecified.
    values, indices = probabilities.sort(dim=1, descending=True, stable=True)
    count = min(top_k, len(class_names))
    return [
        {"image": str(path), "top": [{"class": class_names[i], "probability": float(p)} for p, i in zip(row, order)]}
        for path, row, order in zip(paths, values[:, :count].tolist(), indices[:, :count].tolist())
    ]


def _decoded_batches(
    files: list[Path], size: int, batch_size: int
) -> Iterator[tuple[list[Path], torch.Tensor, list[tuple[str, str]]]]:
    """(readable paths, their uint8 images, skipped (path, why)) per batch of files."""

    def read(path: Path) -> torch.Tensor | str:
        try:
            return load_image(path, size)
        except ImageError as error:
            return error.message

    with ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            decoded = list(pool.map(read, chunk))
            good = [(path, image) for path, image in zip(chunk, decoded) if isinstance(image, torch.Tensor)]
            skipped = [(str(path), why) for path, why in zip(chunk, decoded) if isinstance(why, str)]
            images = (
                torch.stack([image for _, image in good]) if good else torch.empty(0, 3, size, size, dtype=torch.uint8)
            )
            yield [path for path, _ in good], images, skipped

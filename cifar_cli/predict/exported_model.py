"""Running an exported model (.onnx through ONNX Runtime, .pt2 through `torch.export.load`) with its contract: the
pixels it takes, its classes, TTA level and batch, stored inside the file (see `export/writer.py`)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cifar_cli.errors import CifarError, UsageError

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
METADATA_KEY = "cifar"
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
EXPORTED_SUFFIXES = (".onnx", ".pt2")
Runner = Callable[[torch.Tensor], torch.Tensor]  # float pixels in [0, 1] -> logits


@dataclass(frozen=True)
class Exported:
    run: Runner
    contract: dict[str, Any]


def load_exported(path: Path) -> Exported:
    """An exported file, run by its own runtime: ONNX Runtime for .onnx, `torch.export.load` for .pt2."""
    if not path.is_file():
        raise UsageError(f"No exported model at {path}.")
    try:
        return _load_onnx(path) if path.suffix == ".onnx" else _load_pt2(path)
    except (CifarError, KeyboardInterrupt):
        raise
    except Exception as error:  # each runtime raises its own types for a damaged file
        raise UsageError(f"{path} is not a readable {path.suffix[1:]} export ({type(error).__name__}).") from None


def _load_onnx(path: Path) -> Exported:
    require_onnx()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    contract = json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])

    def run(pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})[0])

    return Exported(run, contract)


def _load_pt2(path: Path) -> Exported:
    extra = {f"{METADATA_KEY}.json": ""}
    module = torch.export.load(path, extra_files=extra).module()
    contract = json.loads(extra[f"{METADATA_KEY}.json"])

    def run(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(pixels)

    return Exported(run, contract)


def fixed_batch(contract: dict[str, Any]) -> int | None:
    """The batch an export was made for, or None where it takes any."""
    size = contract["input"]["shape"][0]
    return size if isinstance(size, int) else None


def run_batches(run: Runner, pixels: torch.Tensor, batch: int | None, chunk: int = 256) -> torch.Tensor:
    """Logits of every image, in chunks; a fixed-batch export gets its last chunk padded to the batch."""
    size = batch or chunk
    parts = []
    with torch.no_grad():
        for start in range(0, len(pixels), size):
            part = pixels[start : start + size]
            missing = size - len(part) if batch else 0
            if missing:
                part = torch.cat([part, part.new_zeros(missing, *part.shape[1:])])
            parts.append(run(part)[: size - missing].float())
    return torch.cat(parts)


def require_onnx() -> None:
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"ONNX export needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed.",
            hint="pip install -e '.[export]' (make install does it), or export with --format pt2.",
        )

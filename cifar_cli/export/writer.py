"""Export a checkpoint as an ONNX model or a `torch.export` program (.pt2), verified against the checkpoint.

The exported graph takes pixels, not our normalisation constants: float32 N x 3 x 32 x 32, RGB, values in [0, 1]
(a uint8 image divided by 255); normalisation and, where asked, test-time augmentation are inside it. Output:
logits, N x classes. fp32 and the contiguous layout (ONNX has no channels_last; ONNX Runtime's CPU provider has no
fp16 convolutions). The contract is stored in the file: ONNX `metadata_props["cifar"]`, the .pt2 archive's
`extra/cifar.json`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_cli.config.sections import DataSettings
from cifar_cli.data import ensure_prepared
from cifar_cli.data.prepare import load_cache
from cifar_cli.data.spec import DataSpec
from cifar_cli.errors import CifarError, UsageError
from cifar_cli.files import write_atomically
from cifar_cli.predict.exported_model import (
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAME,
    load_exported,
    require_onnx,
    run_batches,
)
from cifar_cli.predict.inference import check_same_classes, load_model, tta_logits
from cifar_cli.train.identity import provenance

FORMATS = ("onnx", "pt2")
VERIFY_IMAGES = 512
RELATIVE_TOLERANCE = 1e-4  # of the largest logit: float reordering between runtimes stays far below it
MAX_DYNAMIC_BATCH = 65_536


class PixelClassifier(nn.Module):
    """The trained network behind the pixel contract: normalisation and TTA inside, logits out."""

    def __init__(self, model: nn.Module, tta: int, spec: DataSpec) -> None:
        super().__init__()
        self.model, self.tta = model, tta
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))  # the training images' own
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return tta_logits(self.model, (pixels - self.mean) / self.std, self.tta)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    size_bytes: int
    verified_images: int
    max_abs_difference: float
    relative_difference: float
    top1_agreement: float
    accuracy: float  # of the exported file on the test split
    checkpoint_accuracy: float
    contract: dict[str, Any]


def export_checkpoint(
    checkpoint: Path,
    data: DataSettings,
    fmt: str = "onnx",
    out: Path | None = None,
    batch: int | None = None,
    tta: bool | None = None,
    opset: int | None = None,
    say: Callable[[str], None] = lambda _text: None,
) -> ExportResult:
    """Write the export under a temporary name, load it with its own runtime and compare it with the checkpoint on
    512 test images, then rename it over `out`: a file that disagrees is deleted and refused (exit 1), and whatever
    was at `out` before (an earlier good export) stays as it was until a verified file replaces it."""
    if fmt not in FORMATS:
        raise UsageError(f"Unknown export format {fmt!r}.", hint=f"Use one of: {', '.join(FORMATS)}.")
    if fmt == "onnx":
        require_onnx()
    out = out or checkpoint.with_suffix(f".{fmt}")
    _refuse_checkpoint_as_out(checkpoint, out, fmt)
    loaded = load_model(checkpoint, torch.device("cpu"))
    model = loaded.model.float().to(memory_format=torch.contiguous_format).eval()
    classifier = PixelClassifier(model, loaded.train_settings.tta_level(tta), loaded.spec).eval()
    ensure_prepared(data, say)
    check_same_classes(loaded.spec.class_names, loaded.spec.image_size, data, checkpoint)
    cache = load_cache(data.processed_dir)
    pixels, labels = cache["test_images"].float() / 255, cache["test_labels"]
    checkpoint_logits = run_batches(classifier, pixels, batch)
    contract = _contract(loaded, classifier.tta, batch, fmt, _accuracy(checkpoint_logits, labels))
    say(f"Exporting {checkpoint} as {fmt} (TTA level {classifier.tta}, batch {batch or 'dynamic'}).")
    example = pixels[:1].repeat(batch or 2, 1, 1, 1)  # any images will do: export traces shapes, not values
    payload = (
        onnx_bytes(classifier, example, batch, opset, contract)
        if fmt == "onnx"
        else pt2_bytes(classifier, example, batch, contract)
    )
    # The file's own runtime reads it by its suffix: the temporary name keeps the format's.
    candidate = out.with_name(f".{out.name}.{os.getpid()}.verifying.{fmt}")
    write_atomically(candidate, payload, hint="Choose another --out.")
    try:
        runner = load_exported(candidate).run
        exported_logits = run_batches(runner, pixels, batch)
        result = _verify(candidate, checkpoint_logits, exported_logits, labels, contract, out.name)
        candidate.replace(out)
    except OSError as error:
        raise CifarError(f"Could not write {out}: {error.strerror or error}.", hint="Choose another --out.") from None
    finally:
        candidate.unlink(missing_ok=True)
    return replace(result, path=out)


def _refuse_checkpoint_as_out(checkpoint: Path, out: Path, fmt: str) -> None:
    """An export never takes the place of a checkpoint: not the one exported, nor any file named as one."""
    same = out.exists() and checkpoint.exists() and out.resolve() == checkpoint.resolve()
    if same or out.suffix == ".pth":
        raise UsageError(
            f"--out {out} would overwrite {'the checkpoint being exported' if same else 'a checkpoint file (.pth)'}.",
            hint=f"Write the export to a file of its own, e.g. --out {checkpoint.with_suffix('.' + fmt)}.",
        )
    if out.suffix != f".{fmt}":  # predict, evaluate and a teacher read an export by its suffix
        raise UsageError(
            f"--out {out} does not end in .{fmt}, but --format {fmt} writes a .{fmt} file: "
            "`cifar predict` and `cifar evaluate` tell an export's kind by its suffix.",
            hint=f"Use --out {out.with_suffix('.' + fmt)}"
            + (f", or --format {out.suffix[1:]}" if out.suffix[1:] in FORMATS else "")
            + ".",
        )


def _contract(loaded: Any, tta: int, batch: int | None, fmt: str, accuracy: float) -> dict[str, Any]:
    spec, size = loaded.spec, loaded.spec.image_size
    return {
        "format": fmt,
        "input": {
            "name": INPUT_NAME,
            "shape": [batch or "N", 3, size, size],
            "dtype": "float32",
            "layout": "NCHW, RGB",
            "range": [0.0, 1.0],
            "meaning": "uint8 pixels / 255",
        },
        "normalisation_inside": True,
        "output": {
            "name": OUTPUT_NAME,
            "shape": [batch or "N", spec.num_classes],
            "meaning": "logits"
            + (
                "; softmax(logits / temperature.value) are the calibrated probabilities"
                if loaded.state.get("temperature")
                else ""
            ),
        },
        "temperature": loaded.state.get("temperature"),  # `cifar calibrate`'s, fitted on the validation split
        "tta_level": tta,
        "class_names": list(spec.class_names),
        "normalisation": {"mean": list(spec.mean), "std": list(spec.std)},
        "model": loaded.state["model_name"],
        "run_name": loaded.state.get("run_name"),
        "epoch": loaded.state["epoch"],
        "checkpoint_test_accuracy": accuracy,
        "val_size": loaded.data_settings.val_size if isinstance(loaded.data_settings.val_size, int) else 0,
        "seed": loaded.train_settings.seed,
        "data": loaded.data_settings.model_dump(mode="json"),  # where `cifar evaluate` finds its test images
        "made_by": provenance(),  # of this export; the checkpoint's own below
        "checkpoint_made_by": loaded.state.get("made_by"),
    }


def _dynamic_shapes(batch: int | None) -> dict[str, Any] | None:
    return None if batch else {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)}}


def pt2_bytes(classifier: nn.Module, example: torch.Tensor, batch: int | None, contract: dict) -> bytes:
    program = torch.export.export(classifier, (example,), dynamic_shapes=_dynamic_shapes(batch))
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={f"{METADATA_KEY}.json": json.dumps(contract)})
    return buffer.getvalue()


def onnx_bytes(
    classifier: nn.Module, example: torch.Tensor, batch: int | None, opset: int | None, contract: dict
) -> bytes:
    program = torch.onnx.export(
        classifier,
        (example,),
        dynamo=True,
        dynamic_shapes=_dynamic_shapes(batch),
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        verbose=False,
    )
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(contract)
    return proto.SerializeToString()


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def _verify(
    path: Path, expected: torch.Tensor, actual: torch.Tensor, labels: torch.Tensor, contract: dict, name: str
) -> ExportResult:
    sample = slice(0, VERIFY_IMAGES)
    difference = float((expected[sample] - actual[sample]).abs().max())
    relative = difference / max(float(expected[sample].abs().max()), 1e-12)
    agreement = float((expected[sample].argmax(1) == actual[sample].argmax(1)).float().mean())
    if relative > RELATIVE_TOLERANCE or agreement < 1.0:
        raise CifarError(
            f"The exported {name} does not match the checkpoint on {min(VERIFY_IMAGES, len(labels))} test "
            f"images: max |logit difference| {difference:.3g} ({relative:.2g} of the largest logit; limit "
            f"{RELATIVE_TOLERANCE:g}), top-1 agreement {agreement:.2%}. It was not kept (a file already at that path is unchanged)."
        )
    return ExportResult(
        path,
        path.stat().st_size,
        min(VERIFY_IMAGES, len(labels)),
        difference,
        relative,
        agreement,
        _accuracy(actual, labels),
        contract["checkpoint_test_accuracy"],
        contract,
    )

"""Matplotlib figures of a run, written as PNG files. Uses `Figure` objects directly (no pyplot state, no display)."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cifar_cli.config.sections import DataSettings
from cifar_cli.errors import UsageError
from cifar_cli.files import write_atomically
from cifar_cli.predict.evaluate import Evaluation, run_evaluation
from cifar_cli.predict.inference import checkpoint_data

DPI = 120


def save_figure(figure: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    write_atomically(path, buffer.getvalue())
    return path


def curves_figure(history: list[dict[str, Any]]) -> Figure:
    """Loss, accuracy, macro F1 and learning rate per epoch: train, and validation (or, for a recipe without a
    validation split, the test split: shown, never used to choose) side by side."""
    figure = Figure(figsize=(11, 8))
    axes = figure.subplots(2, 2)
    epochs = [record["epoch"] for record in history]
    panels = [("loss", "cross-entropy loss"), ("accuracy", "accuracy"), ("f1", "macro F1")]
    for axis, (metric, label) in zip(axes.flat, panels):
        for split, style in (("train", "-o"), ("val", "-s"), ("test", "-^")):
            values = [record.get(f"{split}_{metric}") for record in history]
            if any(v is not None for v in values):
                axis.plot(epochs, values, style, markersize=3, label=split)
        axis.set(title=label, xlabel="epoch", ylabel=label)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    lr_axis = axes.flat[3]
    lr_axis.plot(
        epochs, [record["lr"] for record in history], "-o", markersize=3, color="tab:purple", label="lr (end of epoch)"
    )
    lr_axis.set(title="learning rate", xlabel="epoch", ylabel="learning rate")
    lr_axis.grid(alpha=0.3)
    lr_axis.legend()
    for axis in axes.flat:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one epoch: tick 1, not 0.95
    figure.tight_layout()
    return figure


ANNOTATED_CLASSES = 20  # up to this many classes each confusion cell shows its count; beyond, colour only


def confusion_matrix_figure(matrix: list[list[int]], class_names: list[str]) -> Figure:
    """Rows normalised to sum to 1 (colour); with few classes each cell also shows its count. The figure grows
    with the class count (0.12 inch per class beyond 20) and labels shrink, so 100 classes stay legible."""
    counts = np.asarray(matrix)
    classes = len(class_names)
    normalised = counts / np.clip(counts.sum(axis=1, keepdims=True), 1, None)
    side = 7 + max(0, classes - ANNOTATED_CLASSES) * 0.12
    figure = Figure(figsize=(side + 1, side))
    axis = figure.subplots()
    image = axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axis, label="fraction of the true class", shrink=0.8)
    ticks = range(classes)
    label_size = 9 if classes <= ANNOTATED_CLASSES else 5
    axis.set_xticks(
        ticks,
        class_names,
        rotation=45 if classes <= ANNOTATED_CLASSES else 90,
        ha="right",
        fontsize=label_size,
        rotation_mode="anchor",
    )
    axis.set_yticks(ticks, class_names, fontsize=label_size)
    axis.set(xlabel="predicted class", ylabel="true class", title="Confusion matrix")
    if classes <= ANNOTATED_CLASSES:
        for row in ticks:
            for col in ticks:
                colour = "white" if normalised[row, col] > 0.5 else "black"
                axis.text(col, row, f"{counts[row, col]}", ha="center", va="center", fontsize=7, color=colour)
    figure.tight_layout()
    return figure


def per_class_figure(per_class: dict[str, dict[str, float]]) -> Figure:
    """Recall (the per-class accuracy) and F1 for each class; wider with more classes (0.12 inch each beyond 20)."""
    names = list(per_class)
    recall = [per_class[name]["recall"] for name in names]
    f1 = [per_class[name]["f1"] for name in names]
    positions = np.arange(len(names))
    many = len(names) > ANNOTATED_CLASSES
    figure = Figure(figsize=(10 + max(0, len(names) - ANNOTATED_CLASSES) * 0.12, 4.5))
    axis = figure.subplots()
    axis.bar(positions - 0.2, recall, width=0.4, label="accuracy (recall)")
    axis.bar(positions + 0.2, f1, width=0.4, label="F1")
    axis.set_xticks(
        positions, names, rotation=90 if many else 30, ha="center" if many else "right", fontsize=6 if many else 10
    )
    axis.set(ylim=(0, 1), ylabel="fraction", title="Per-class accuracy and F1", xlim=(-0.6, len(names) - 0.4))
    axis.grid(axis="y", alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    return figure


def predictions_figure(
    images: np.ndarray, targets: list[int], predicted: list[int], class_names: list[str], columns: int = 8
) -> Figure:
    """A grid of uint8 N x 3 x S x S images titled 'true / predicted'; mistakes in red with a red frame."""
    rows = -(-len(images) // columns)
    figure = Figure(figsize=(columns * 1.5, rows * 1.9))
    axes = list(np.atleast_1d(figure.subplots(rows, columns)).flat)
    for axis in axes[len(images) :]:
        axis.axis("off")
    for axis, image, target, guess in zip(axes, images, targets, predicted):
        wrong = target != guess
        axis.imshow(image.transpose(1, 2, 0), interpolation="nearest")
        axis.set_title(f"{class_names[target]}\n→ {class_names[guess]}", fontsize=8, color="red" if wrong else "black")
        axis.set_xticks([])
        axis.set_yticks([])
        for spine in axis.spines.values():
            spine.set(color="red" if wrong else "grey", linewidth=2.5 if wrong else 0.5)
    figure.suptitle("Test images: true class → prediction (mistakes in red)")
    figure.tight_layout()
    return figure


# ------------------------------------------------------------------------------------------------ a run's plots

PREDICTION_SAMPLES = 32  # test images in predictions.png


@dataclass(frozen=True)
class PlotSources:
    run_dir: Path | None
    checkpoint: Path | None
    history: list[dict[str, Any]]


def find_sources(target: Path | None, log_dir: Path, checkpoint_dir: Path) -> PlotSources:
    """Resolve a run folder, a checkpoint file, or (None) the most recent run under `log_dir`."""
    from cifar_cli.checkpoint import load_checkpoint
    from cifar_cli.train.tracking import HISTORY_FILE, read_history

    if target is None:
        runs = sorted(log_dir.glob(f"*/{HISTORY_FILE}"), key=lambda p: p.stat().st_mtime) if log_dir.is_dir() else []
        if not runs:
            raise UsageError(
                f"No runs with a history in {log_dir}.", hint="Train first, or pass a run folder or checkpoint."
            )
        target = runs[-1].parent
    if target.is_file():
        state = load_checkpoint(target)
        if not state["history"]:
            raise UsageError(f"{target} has no training history to plot.")
        return PlotSources(None, target, list(state["history"]))
    if not target.is_dir():
        raise UsageError(f"{target} is neither a run folder nor a checkpoint file.")
    history = read_history(target)
    if not history:
        raise UsageError(
            f"{target} has no {HISTORY_FILE}.", hint="Pass a run folder made by `cifar train` (log_dir/<run>)."
        )
    recorded = _recorded_settings(target)
    # The run's own folders first (it may have been trained with --checkpoint-dir / --processed-dir), then the
    # ones given now. last.pth: the final weights, which the run's reported accuracy is about.
    folders = [Path(recorded.get("log", {}).get("checkpoint_dir", checkpoint_dir)), checkpoint_dir]
    checkpoint = next((f / target.name / "last.pth" for f in folders if (f / target.name / "last.pth").is_file()), None)
    return PlotSources(target, checkpoint, history)


def _recorded_settings(run_dir: Path) -> dict[str, Any]:
    """The settings a run folder records; {} when absent or unreadable (the plots then use their defaults)."""
    from cifar_cli.errors import UsageError
    from cifar_cli.runs import read_run_settings

    try:
        return read_run_settings(run_dir)
    except UsageError:
        return {}


def write_run_plots(
    target: Path | None,
    out: Path | None,
    log_dir: Path,
    checkpoint_dir: Path,
    data: DataSettings,
    device_name: str = "auto",
    say: Callable[[str], None] = lambda _text: None,
    keep_data: set[str] = frozenset(),
) -> list[Path]:
    """curves.png always; confusion_matrix.png, per_class.png, predictions.png, mistakes.png, reliability.png and
    gradcam.png when a checkpoint is found (on the data it was trained on, but for the data settings in
    `keep_data`: see `checkpoint_data`)."""
    sources = find_sources(target, log_dir, checkpoint_dir)
    out = out or (sources.run_dir or sources.checkpoint.parent) / "plots"
    written = [save_figure(curves_figure(sources.history), out / "curves.png")]
    if sources.checkpoint is None:
        say(f"No checkpoint of this run found in {checkpoint_dir}: only the training curves were drawn.")
        return written
    data = checkpoint_data(sources.checkpoint, data, keep_data)
    say(f"Evaluating {sources.checkpoint} on the test split for the other plots.")
    evaluation = run_evaluation(sources.checkpoint, data, "test", device_name=device_name, say=say)
    metrics = evaluation.metrics
    written.append(
        save_figure(
            confusion_matrix_figure(metrics["confusion_matrix"], metrics["class_names"]), out / "confusion_matrix.png"
        )
    )
    written.append(save_figure(per_class_figure(metrics["per_class"]), out / "per_class.png"))
    written.append(save_figure(_sample_predictions_figure(evaluation), out / "predictions.png"))
    written += _explaining_plots(sources.checkpoint, evaluation, out, device_name)
    return written


def _explaining_plots(checkpoint: Path, evaluation: Evaluation, out: Path, device_name: str) -> list[Path]:
    """mistakes.png, reliability.png and (the model's layers needed: checkpoints, not exports) gradcam.png."""
    from cifar_cli.predict.exported_model import EXPORTED_SUFFIXES
    from cifar_cli.predict.inference import load_model
    from cifar_cli.runtime.device import resolve_device
    from cifar_cli.ui.plots_explain import gradcam_figure, mistakes_figure, reliability_figure

    written = [save_figure(mistakes_figure(evaluation), out / "mistakes.png")]
    written.append(save_figure(reliability_figure(evaluation), out / "reliability.png"))
    if checkpoint.suffix not in EXPORTED_SUFFIXES:
        loaded = load_model(checkpoint, resolve_device(device_name))
        written.append(save_figure(gradcam_figure(evaluation, loaded), out / "gradcam.png"))
    return written


def _sample_predictions_figure(evaluation: Evaluation) -> Figure:
    """A fixed, spread-out sample of the evaluation's own predictions (same pass as the confusion matrix)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    count = min(PREDICTION_SAMPLES, len(evaluation.targets))
    index = torch.randperm(len(evaluation.targets), generator=generator)[:count]
    return predictions_figure(
        evaluation.images[index].numpy(),
        evaluation.targets[index].tolist(),
        evaluation.predicted[index].tolist(),
        evaluation.metrics["class_names"],
    )


def sweep_figure(recipes: list[dict[str, Any]], keys: list[str]) -> Figure:
    """Validation accuracy (mean over seeds, with its std) against each varied setting, one panel per setting."""
    keys = keys or ["recipe"]
    figure = Figure(figsize=(4.5 * len(keys), 3.6))
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    for axis, key in zip(axes, keys):
        points = [
            (r.get(key, i), r["val_accuracy_mean"], r["val_accuracy_std"] or 0.0)
            for i, r in enumerate(recipes)
            if r["val_accuracy_mean"] is not None
        ]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _, _ in points)
        xs = [x if numeric else str(x) for x, _, _ in points]
        axis.errorbar(xs, [y for _, y, _ in points], yerr=[e for _, _, e in points], fmt="o", capsize=3)
        if numeric and len({x for x in xs}) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 20:
            axis.set_xscale("log")
        axis.set(title=key, xlabel=key, ylabel="validation accuracy")
        axis.grid(alpha=0.3)
    figure.suptitle("Sweep: validation accuracy, mean ± std over seeds (nothing chosen on test)")
    figure.tight_layout()
    return figure

"""`cifar evaluate`: accuracy, per-class precision / recall / F1 and the confusion matrix of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cifar_cli.cli.common import (
    CheckpointProcessedDirOption,
    CheckpointRawDirOption,
    ConfigOption,
    DeviceOption,
    SetOption,
    console,
    error_console,
    flag_settings,
    given_data_settings,
    resolve,
)
from cifar_cli.errors import SettingsError

# Up to this many classes the console shows every class and the whole confusion matrix; beyond, the classes with the
# lowest F1 and the most confused pairs (the JSON output always has everything).
TABLE_CLASSES = 20
WORST_CLASSES = 10


def evaluate(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint written by `cifar train` (best.pth or last.pth), or an export.")
    ],
    split: Annotated[str, typer.Option("--split", help="test, train or val.")] = "test",
    tta: Annotated[
        bool | None, typer.Option("--tta/--no-tta", help="Test-time augmentation (default: as trained).")
    ] = None,
    tta_share: Annotated[
        float | None,
        typer.Option(
            "--tta-share",
            max=1.0,
            help="Selective TTA: every view only for this share of the images, the least sure (default: as trained).",
        ),
    ] = None,
    device: DeviceOption = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per inference batch.")] = 1000,
    json_file: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the metrics to this JSON file; - prints only them, as JSON."),
    ] = None,
    predictions_file: Annotated[
        Path | None,
        typer.Option(
            "--predictions", help="Also write each image's index, true class, prediction and probability (CSV)."
        ),
    ] = None,
    raw_dir: CheckpointRawDirOption = None,
    processed_dir: CheckpointProcessedDirOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    """Accuracy, macro and per-class precision / recall / F1 and the confusion matrix of a checkpoint."""
    if split not in ("test", "train", "val"):
        raise SettingsError("Bad option.", [("--split", "must be test, train or val", split)])
    if tta_share is not None and tta_share <= 0:
        raise SettingsError("Bad option.", [("--tta-share", "must be above 0 (at most 1)", str(tta_share))])
    flags = flag_settings(evaluate, locals())
    settings = resolve(config, set_options, flags)
    from cifar_cli.files import write_text_atomically
    from cifar_cli.predict.evaluate import run_evaluation
    from cifar_cli.predict.inference import checkpoint_data

    evaluation = run_evaluation(
        checkpoint,
        checkpoint_data(checkpoint, settings.data, given_data_settings(set_options, flags)),
        split,
        tta=tta,
        tta_share=tta_share,
        device_name=settings.train.device,
        batch_size=batch_size,
        say=error_console.print,
        keep_memory=settings.train.keep_freed_memory,
    )
    metrics = evaluation.metrics
    json_on_stdout = json_file is not None and str(json_file) == "-"
    if json_on_stdout:  # the document alone on stdout, as `predict --json -`: the rest goes to stderr
        console.print_json(json.dumps(metrics))
    else:
        print_metrics(metrics)
    status = error_console if json_on_stdout else console
    if json_file is not None and not json_on_stdout:
        write_text_atomically(json_file, json.dumps(metrics, indent=2))
        status.print(f"Metrics written to {json_file}")
    if predictions_file:
        write_text_atomically(predictions_file, predictions_csv(evaluation))
        status.print(f"Predictions written to {predictions_file}")


def predictions_csv(evaluation: Any) -> str:
    """index (in the split), true class, predicted class, its probability (after the stored temperature)."""
    import csv
    import io

    names = evaluation.metrics["class_names"]
    probabilities = evaluation.probabilities
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["index", "true", "predicted", "probability"])
    for index, (true, guess) in enumerate(zip(evaluation.targets.tolist(), evaluation.predicted.tolist())):
        writer.writerow([index, names[true], names[guess], f"{float(probabilities[index, guess]):.6f}"])
    return buffer.getvalue()


def _tta_words(metrics: dict[str, Any]) -> str:
    share = metrics.get("tta_share", 1.0)
    if not metrics["tta"]:
        return ""
    return ", with TTA" if share >= 1 else f", with TTA for the {share:.0%} least sure"


def print_metrics(metrics: dict[str, Any]) -> None:
    console.print(
        f"[bold]{metrics['checkpoint']}[/bold] (model {metrics['model']}, epoch {metrics['epoch']}): "
        f"{metrics['split']} split, {metrics['num_samples']:,} images{_tta_words(metrics)}"
    )
    summary = Table("metric", "value")
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
        summary.add_row(key.replace("_", " "), f"{metrics[key]:.2%}")
    summary.add_row("calibration error (ECE)", f"{metrics['ece']:.2%}")
    if metrics.get("temperature"):
        summary.add_row(f"ECE at temperature {metrics['temperature']:.3f}", f"{metrics['ece_calibrated']:.2%}")
    console.print(summary)
    names = metrics["class_names"]
    many = len(names) > TABLE_CLASSES
    rows = (
        sorted(metrics["per_class"].items(), key=lambda item: item[1]["f1"])[:WORST_CLASSES]
        if many
        else (metrics["per_class"].items())
    )
    title = f"The {WORST_CLASSES} classes with the lowest F1 (of {len(names)})" if many else "Per class"
    per_class = Table("class", "precision", "recall", "F1", "support", title=title, title_justify="left")
    for name, values in rows:
        per_class.add_row(
            name, f"{values['precision']:.2%}", f"{values['recall']:.2%}", f"{values['f1']:.2%}", str(values["support"])
        )
    console.print(per_class)
    console.print(most_confused_table(metrics) if many else confusion_table(metrics))


def confusion_table(metrics: dict[str, Any]) -> Table:
    names = metrics["class_names"]
    confusion = Table(
        "true \\ predicted", *[name[:5] for name in names], title="Confusion matrix", title_justify="left"
    )
    for name, row in zip(names, metrics["confusion_matrix"]):
        confusion.add_row(name, *[str(count) for count in row])
    return confusion


def most_confused_table(metrics: dict[str, Any]) -> Table:
    """For many classes: the largest mistakes instead of an unreadable N x N grid (`--json` has the matrix)."""
    from cifar_cli.predict.metrics import most_confused

    pairs = most_confused(metrics["confusion_matrix"], metrics["class_names"], WORST_CLASSES)
    table = Table("true class", "predicted as", "images", title="Most confused pairs", title_justify="left")
    for true, guess, images in pairs:
        table.add_row(true, guess, str(images))
    return table

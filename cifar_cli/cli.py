"""The `cifar` command. Each command: flags -> Settings -> one core call -> render the result or the error.

No torch code lives here; heavy modules are imported inside the commands so `cifar --help` stays instant.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from cifar_cli import __version__
from cifar_cli.durations import format_duration
from cifar_cli.errors import CifarError, SettingsError
from cifar_cli.settings import (
    MODEL_RECIPES,
    LogSettings,
    OptimSettings,
    SchedulerSettings,
    Settings,
    TrainSettings,
    available_presets,
    choices,
    dump_yaml,
    load_settings,
    parse_set_options,
    set_dotted,
)

app = typer.Typer(
    help="CIFAR-10 from nothing to a trained, evaluated, plotted classifier.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
config_app = typer.Typer(help="Inspect the resolved settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console()
error_console = Console(stderr=True)

PATHS = "Paths"
RECIPE = "Recipe"
RUN = "Run"
# `cifar evaluate`: up to this many classes the console shows every class and the whole confusion matrix; beyond,
# the classes with the lowest F1 and the most confused pairs (the JSON output always has everything).
TABLE_CLASSES = 20
WORST_CLASSES = 10


@dataclass(frozen=True)
class Sets:
    """Marks a command-line option with the setting it overrides, in the option's own annotation: adding a flag is
    one parameter (`flag_settings` finds it)."""

    key: str
    invert: bool = False  # --no-png sets data.write_png to false


# Options shared by several commands, defined once.
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML settings file (default: ./settings.yaml when present).",
        rich_help_panel=RUN,
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Any setting as dotted.key=value, e.g. optim.momentum=0.85 (repeatable).",
        rich_help_panel=RUN,
    ),
]
DatasetOption = Annotated[
    str | None,
    typer.Option(
        "--dataset",
        help="cifar10 or cifar100 (official archives), or folder (your images, see `cifar prepare --from-folder`). "
        "Default: whatever is prepared, else cifar10.",
    ),
    Sets("data.dataset"),
]
LabelSetOption = Annotated[
    str | None,
    typer.Option("--label-set", help="cifar100: fine (100 classes, default) or coarse (20 superclasses)."),
    Sets("data.label_set"),
]
RawDirOption = Annotated[
    Path | None,
    typer.Option("--raw-dir", help="Where the archive is downloaded.", rich_help_panel=PATHS),
    Sets("data.raw_data_dir"),
]
ProcessedDirOption = Annotated[
    Path | None,
    typer.Option("--processed-dir", help="Where PNG folders and the tensor cache go.", rich_help_panel=PATHS),
    Sets("data.processed_dir"),
]
CheckpointDirOption = Annotated[
    Path | None,
    typer.Option("--checkpoint-dir", help="Checkpoints go to <dir>/<run>/.", rich_help_panel=PATHS),
    Sets("log.checkpoint_dir"),
]
LogDirOption = Annotated[
    Path | None,
    typer.Option("--log-dir", help="TensorBoard logs and history go to <dir>/<run>/.", rich_help_panel=PATHS),
    Sets("log.log_dir"),
]
DeviceOption = Annotated[
    str | None,
    typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", rich_help_panel=RUN),
    Sets("train.device"),
]


def flag_settings(command: Callable[..., Any], arguments: dict[str, Any]) -> dict[str, Any]:
    """{setting: value} for the options of `command` that were given (None or an empty list: not given)."""
    given = {}
    for name, hint in typing.get_type_hints(command, include_extras=True).items():
        marker = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Sets)), None)
        value = arguments.get(name)
        if marker is not None and value not in (None, []):
            given[marker.key] = (not value) if marker.invert else value
    return given


def resolve(
    config: Path | None, set_options: list[str] | None, flags: dict[str, Any] | None = None
) -> Settings:
    """Settings from every source; flags beat `--set`, which beats environment, YAML, preset and defaults."""
    overrides = parse_set_options(set_options or [])
    for key, value in (flags or {}).items():
        set_dotted(overrides, key, value)
    return load_settings(config, overrides)


@contextlib.contextmanager
def handled_errors() -> Iterator[None]:
    """Turn every expected failure into a short message and an exit code; never a traceback."""
    try:
        yield
    except SettingsError as error:
        table = Table(
            "setting", "problem", "given", title=error.message, title_justify="left", border_style="red"
        )
        for row in error.rows:
            table.add_row(*row)
        error_console.print(table)
        if error.hint:
            error_console.print(f"[dim]{error.hint}[/dim]")
        raise typer.Exit(error.exit_code) from None
    except CifarError as error:
        # Text, not markup: messages quote user input ("[1,"); fold, not crop, so long paths stay whole.
        body = Text(error.message, overflow="fold")
        if error.hint:
            body.append(f"\n\n{error.hint}", style="dim")
        error_console.print(
            Panel(body, title="cifar: error", title_align="left", border_style="red", expand=False)
        )
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        error_console.print("Interrupted.")
        raise typer.Exit(130) from None


def _version(value: bool) -> None:
    if value:
        console.print(f"cifar {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """CIFAR-10 from nothing to a trained, evaluated, plotted classifier: download, prepare, train, evaluate, plot."""


# ---------------------------------------------------------------------------------------------------- config


@config_app.command("show")
def config_show(config: ConfigOption = None, set_options: SetOption = None) -> None:
    """Print the resolved settings as YAML (defaults < preset < YAML < environment < --set)."""
    with handled_errors():
        console.print(dump_yaml(resolve(config, set_options)), end="", highlight=False, markup=False)


# ---------------------------------------------------------------------------------------------------- download


@app.command()
def download(
    dataset: DatasetOption = None,
    label_set: LabelSetOption = None,
    urls: Annotated[
        list[str] | None,
        typer.Option("--url", help="Mirror to try, in order: http(s)://, file:// or a path (repeatable)."),
        Sets("data.urls"),
    ] = None,
    md5: Annotated[
        str | None,
        typer.Option("--md5", help="Expected MD5 of the archive (default: the official archive's)."),
        Sets("data.md5"),
    ] = None,
    raw_dir: RawDirOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Download again even if a valid archive is present.")
    ] = False,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    """Fetch the CIFAR-10 (or --dataset cifar100) python archive, resume partial downloads, verify its checksum."""
    from cifar_cli.data import download_for

    with handled_errors():
        data = resolve(config, set_options, flag_settings(download, locals())).data
        with _transfer_progress() as (on_progress, on_message):
            result = download_for(data, force=force, on_progress=on_progress, on_message=on_message)
        if result.already_present:
            console.print(
                f"Already downloaded and verified: {result.path} (md5 {result.md5}). Nothing to do."
            )
        else:
            console.print(f"Downloaded {result.path} from {result.source} (md5 {result.md5} verified).")


@contextlib.contextmanager
def _transfer_progress() -> Iterator[tuple[Any, Any]]:
    progress = Progress(
        TextColumn("[bold]download"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=error_console,
        transient=True,
        disable=not error_console.is_terminal,
    )
    task = progress.add_task("download", total=None)

    def on_progress(done: int, total: int | None) -> None:
        progress.update(task, completed=done, total=total)

    with progress:
        yield on_progress, progress.console.print


# ---------------------------------------------------------------------------------------------------- prepare


@app.command()
def prepare(
    dataset: DatasetOption = None,
    label_set: LabelSetOption = None,
    from_folder: Annotated[
        Path | None,
        typer.Option(
            "--from-folder",
            help="Prepare your own images: DIR/<class>/*.{png,jpg,jpeg,webp,bmp}, or DIR/train/<class>/... and "
            "DIR/test/<class>/... (sets --dataset folder).",
        ),
        Sets("data.folder"),
    ] = None,
    test_fraction: Annotated[
        float | None,
        typer.Option(
            "--test-fraction", help="Folder without test/: share of each class held out (default 0.2)."
        ),
        Sets("data.test_fraction"),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size", help="Folder images are resized to this square size in pixels (default 32)."
        ),
        Sets("data.image_size"),
    ] = None,
    skip_bad_images: Annotated[
        bool | None,
        typer.Option(
            "--skip-bad-images", help="Skip unreadable images (counted) instead of stopping at the first."
        ),
        Sets("data.skip_bad_images"),
    ] = None,
    raw_dir: RawDirOption = None,
    processed_dir: ProcessedDirOption = None,
    no_png: Annotated[
        bool | None,
        typer.Option("--no-png", help="Only write the tensor cache, no PNG folders."),
        Sets("data.write_png", invert=True),
    ] = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    """Extract the archive safely (or read an image folder) and write PNG-per-class folders plus a tensor cache."""
    from cifar_cli.data import prepare_for

    with handled_errors():
        flags = flag_settings(prepare, locals())
        if from_folder is not None:
            flags["data.dataset"] = "folder"
        data = resolve(config, set_options, flags).data
        with _count_progress() as on_progress:
            result = prepare_for(data, on_progress=on_progress)
        for note in result.notes:
            error_console.print(Text(note, style="yellow"))
        counts = ", ".join(f"{count:,} {split}" for split, count in result.counts.items())
        spec = result.spec
        what = f"{counts} images, {spec.num_classes} classes, {spec.image_size} x {spec.image_size}"
        if result.already_prepared:
            console.print(f"Already prepared in {result.processed_dir} ({what}). Nothing to do.")
        else:
            console.print(f"Prepared {what} in {result.processed_dir}.")


@contextlib.contextmanager
def _count_progress() -> Iterator[Any]:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} images"),
        console=error_console,
        transient=True,
        disable=not error_console.is_terminal,
    )
    tasks: dict[str, Any] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(stage, total=total)
        progress.update(tasks[stage], completed=done)

    with progress:
        yield on_progress


# ---------------------------------------------------------------------------------------------------- train


@app.command()
def train(
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help=f"One of: {', '.join(available_presets())} (default fast).",
            rich_help_panel=RECIPE,
        ),
        Sets("preset"),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="One of: "
            + ", ".join(f"{name} (recipe {recipe})" for name, recipe in MODEL_RECIPES.items())
            + ". Without --preset, the model's own recipe.",
            rich_help_panel=RECIPE,
        ),
        Sets("model.name"),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", help="Epochs to train.", rich_help_panel=RECIPE),
        Sets("train.epochs"),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="Images per step (per process).", rich_help_panel=RECIPE),
        Sets("train.batch_size"),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Learning rate of every parameter under adam, adamw and sgd. Under muon (the fast preset) only "
            "the head's (the biases get optim.bias_lr_scale times it); the filters' is optim.muon_lr.",
            rich_help_panel=RECIPE,
        ),
        Sets("optim.lr"),
    ] = None,
    wd: Annotated[
        float | None,
        typer.Option(
            "--wd",
            help="Weight decay (optim.weight_decay). Under muon, the head's; the biases' is "
            "optim.bias_weight_decay and the filters keep a fixed norm.",
            rich_help_panel=RECIPE,
        ),
        Sets("optim.weight_decay"),
    ] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(
            "--optimizer",
            help=f"One of: {', '.join(choices(OptimSettings, 'name'))} (muon: Muon for conv filters, SGD for the "
            "rest).",
            rich_help_panel=RECIPE,
        ),
        Sets("optim.name"),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            "--scheduler",
            help=f"One of: {', '.join(choices(SchedulerSettings, 'name'))}.",
            rich_help_panel=RECIPE,
        ),
        Sets("scheduler.name"),
    ] = None,
    label_smoothing: Annotated[
        float | None, typer.Option("--label-smoothing", rich_help_panel=RECIPE), Sets("optim.label_smoothing")
    ] = None,
    val_size: Annotated[
        int | None,
        typer.Option(
            "--val-size",
            help="Training images held out for validation (default auto: 5,000 where the recipe monitors a "
            "validation metric, else 0; nothing is ever chosen on the test split).",
            rich_help_panel=RECIPE,
        ),
        Sets("data.val_size"),
    ] = None,
    device: DeviceOption = None,
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision",
            help=f"One of: {', '.join(choices(TrainSettings, 'precision'))}.",
            rich_help_panel=RUN,
        ),
        Sets("train.precision"),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Seeds every random number generator.", rich_help_panel=RUN),
        Sets("train.seed"),
    ] = None,
    run_name: Annotated[
        str | None,
        typer.Option(
            "--run-name", help="Run folder name (default: preset-model-<settings hash>).", rich_help_panel=RUN
        ),
        Sets("train.run_name"),
    ] = None,
    resume: Annotated[
        bool | None,
        typer.Option(
            "--resume/--no-resume",
            help="Continue from last.pth (default: when it exists).",
            rich_help_panel=RUN,
        ),
        Sets("train.resume"),
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option("--compile/--no-compile", help="torch.compile the model.", rich_help_panel=RUN),
        Sets("train.compile"),
    ] = None,
    deterministic: Annotated[
        bool | None,
        typer.Option("--deterministic", help="Use deterministic algorithms only.", rich_help_panel=RUN),
        Sets("train.deterministic"),
    ] = None,
    progress: Annotated[
        str | None,
        typer.Option(
            "--progress", help=f"One of: {', '.join(choices(LogSettings, 'progress'))}.", rich_help_panel=RUN
        ),
        Sets("log.progress"),
    ] = None,
    nproc: Annotated[
        int, typer.Option("--nproc", help="Launch N processes through torchrun (DDP).", rich_help_panel=RUN)
    ] = 1,
    time_budget: Annotated[
        str | None,
        typer.Option(
            "--time-budget",
            help="Fit the run (training + final evaluation) to this wall clock on this machine: 90s, 15m, 1h. "
            "Picks the epochs, and a narrower model if one epoch does not fit.",
            rich_help_panel=RECIPE,
        ),
        Sets("train.time_budget"),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the plan (precision, epochs, steps, time) and exit.", rich_help_panel=RUN
        ),
    ] = False,
    dataset: DatasetOption = None,
    raw_dir: RawDirOption = None,
    processed_dir: ProcessedDirOption = None,
    checkpoint_dir: CheckpointDirOption = None,
    log_dir: LogDirOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    """Train a model (default preset: fast) with checkpoints, TensorBoard logs and a progress display."""
    with handled_errors():
        settings = resolve(config, set_options, flag_settings(train, locals()))
        if dry_run:
            from cifar_cli.display import PlainReporter
            from cifar_cli.engine.train import plan_run

            plan_run(settings, PlainReporter(console))  # prints the measured speeds and the plan
            console.print("Dry run: nothing was trained.")
            return
        if nproc > 1:
            from cifar_cli.engine.device import check_launch

            check_launch(settings.train.device, nproc)  # the same short error as without --nproc
            raise typer.Exit(_launch_torchrun(nproc))
        from cifar_cli.display import make_reporter
        from cifar_cli.engine.train import train as run_training
        from cifar_cli.plots import confusion_matrix_figure

        run_training(settings, make_reporter(settings.log.progress, console), confusion_matrix_figure)


def _launch_torchrun(nproc: int) -> int:
    """Re-run this same command under torchrun with N processes (minus the --nproc flag)."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        args.append(arg)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "cifar_cli",
        *args,
    ]
    console.print("Launching: " + " ".join(command[2:]))
    return subprocess.call(command, env=os.environ.copy())


# ---------------------------------------------------------------------------------------------------- evaluate


@app.command()
def evaluate(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint written by `cifar train` (best.pth or last.pth).")
    ],
    split: Annotated[str, typer.Option("--split", help="test, train or val.")] = "test",
    tta: Annotated[
        bool | None, typer.Option("--tta/--no-tta", help="Test-time augmentation (default: as trained).")
    ] = None,
    device: DeviceOption = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Images per inference batch.")
    ] = 1000,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the metrics to this JSON file.")
    ] = None,
    raw_dir: RawDirOption = None,
    processed_dir: ProcessedDirOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    """Accuracy, macro and per-class precision / recall / F1 and the confusion matrix of a checkpoint."""
    with handled_errors():
        if split not in ("test", "train", "val"):
            raise SettingsError("Bad option.", [("--split", "must be test, train or val", split)])
        settings = resolve(config, set_options, flag_settings(evaluate, locals()))
        from cifar_cli.engine.evaluate import evaluate_checkpoint
        from cifar_cli.files import write_text_atomically

        metrics = evaluate_checkpoint(
            checkpoint,
            settings.data,
            split,
            tta=tta,
            device_name=settings.train.device,
            batch_size=batch_size,
            say=error_console.print,
            keep_memory=settings.train.keep_freed_memory,
        )
        _print_metrics(metrics)
        if json_file:
            write_text_atomically(json_file, json.dumps(metrics, indent=2))
            console.print(f"Metrics written to {json_file}")


def _print_metrics(metrics: dict[str, Any]) -> None:
    console.print(
        f"[bold]{metrics['checkpoint']}[/bold] (model {metrics['model']}, epoch {metrics['epoch']}): "
        f"{metrics['split']} split, {metrics['num_samples']:,} images{', with TTA' if metrics['tta'] else ''}"
    )
    summary = Table("metric", "value")
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
        summary.add_row(key.replace("_", " "), f"{metrics[key]:.2%}")
    console.print(summary)
    names = metrics["class_names"]
    many = len(names) > TABLE_CLASSES
    rows = sorted(metrics["per_class"].items(), key=lambda item: item[1]["f1"])[:WORST_CLASSES] if many else (
        metrics["per_class"].items()
    )  # fmt: skip
    title = f"The {WORST_CLASSES} classes with the lowest F1 (of {len(names)})" if many else "Per class"
    per_class = Table("class", "precision", "recall", "F1", "support", title=title, title_justify="left")
    for name, values in rows:
        per_class.add_row(
            name,
            f"{values['precision']:.2%}",
            f"{values['recall']:.2%}",
            f"{values['f1']:.2%}",
            str(values["support"]),
        )
    console.print(per_class)
    console.print(_most_confused_table(metrics) if many else _confusion_table(metrics))


def _confusion_table(metrics: dict[str, Any]) -> Table:
    names = metrics["class_names"]
    confusion = Table(
        "true \\ predicted", *[name[:5] for name in names], title="Confusion matrix", title_justify="left"
    )
    for name, row in zip(names, metrics["confusion_matrix"]):
        confusion.add_row(name, *[str(count) for count in row])
    return confusion


def _most_confused_table(metrics: dict[str, Any]) -> Table:
    """For many classes: the largest mistakes instead of an unreadable N x N grid (`--json` has the matrix)."""
    from cifar_cli.engine.metrics import most_confused

    pairs = most_confused(metrics["confusion_matrix"], metrics["class_names"], WORST_CLASSES)
    table = Table("true class", "predicted as", "images", title="Most confused pairs", title_justify="left")
    for true, guess, images in pairs:
        table.add_row(true, guess, str(images))
    return table


@app.command()
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `cifar train`.")],
    images: Annotated[list[Path], typer.Argument(help="Image files of any size (resized to 32x32).")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=10, help="Classes to show per image.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    device: DeviceOption = None,
) -> None:
    """Top-k classes with probabilities for image files."""
    with handled_errors():
        from cifar_cli.engine.evaluate import predict_images

        device_name = resolve(None, None, flag_settings(predict, locals())).train.device
        results = predict_images(checkpoint, images, top_k, device_name)
        if as_json:
            console.print_json(json.dumps(results))
            return
        table = Table("image", *[f"#{rank}" for rank in range(1, top_k + 1)])
        for result in results:
            table.add_row(result["image"], *[f"{t['class']} {t['probability']:.1%}" for t in result["top"]])
        console.print(table)


# ---------------------------------------------------------------------------------------------------- export


@app.command("export")
def export_model(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `cifar train` (last.pth).")],
    fmt: Annotated[
        str, typer.Option("--format", help="onnx (ONNX Runtime, everywhere) or pt2 (torch.export).")
    ] = "onnx",
    out: Annotated[
        Path | None, typer.Option("--out", help="File to write (default: the checkpoint's name).")
    ] = None,
    batch: Annotated[
        str, typer.Option("--batch", help="dynamic (any batch size) or a fixed batch size N.")
    ] = "dynamic",
    tta: Annotated[
        bool | None,
        typer.Option("--tta/--no-tta", help="Test-time augmentation inside the graph (default: as trained)."),
    ] = None,
    opset: Annotated[
        int | None, typer.Option("--opset", min=18, help="ONNX opset (default: torch's).")
    ] = None,
    raw_dir: RawDirOption = None,
    processed_dir: ProcessedDirOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    """A model to ship: the checkpoint as ONNX or a torch.export program, verified against it before it is kept."""
    with handled_errors():
        settings = resolve(config, set_options, flag_settings(export_model, locals()))
        if batch != "dynamic" and not (batch.isdigit() and int(batch) > 0):
            raise SettingsError("Bad option.", [("--batch", "dynamic or a positive whole number", batch)])
        from cifar_cli.engine.export import export_checkpoint

        result = export_checkpoint(
            checkpoint, settings.data, fmt, out, None if batch == "dynamic" else int(batch), tta, opset,
            say=error_console.print,
        )  # fmt: skip
        console.print(
            f"Wrote {result.path} ({result.size_bytes / 1e6:.1f} MB). Verified against the checkpoint on "
            f"{result.verified_images} "
            f"test images: max |logit difference| {result.max_abs_difference:.2g} "
            f"({result.relative_difference:.2g} of the largest logit), top-1 agreement {result.top1_agreement:.2%}.\n"
            f"Test accuracy: exported {result.accuracy:.2%}, checkpoint {result.checkpoint_accuracy:.2%} "
            f"(TTA level {result.contract['tta_level']}).\n"
            f"Input: {result.contract['input']['name']}, float32 N x 3 x 32 x 32 RGB in [0, 1] (pixels / 255), "
            "normalisation inside; output: logits."
        )


# ---------------------------------------------------------------------------------------------------- runs


@app.command()
def runs(
    log_dir: LogDirOption = None,
    sort: Annotated[
        str, typer.Option("--sort", help="name, val_accuracy, test_accuracy, seconds or epochs_done.")
    ] = "name",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    """One line per run: the settings that differ between runs, epochs, validation and test accuracy, state."""
    with handled_errors():
        settings = resolve(config, set_options, flag_settings(runs, locals()))
        from cifar_cli.runs import list_runs

        found = list_runs(settings.log.log_dir, sort)
        if as_json:
            console.print_json(json.dumps([run.to_json() for run in found]))
            return
        table = Table("run", "preset", "model", "differs", "epochs", "val acc", "test acc", "time", "state",
                      title=f"Runs in {settings.log.log_dir}", title_justify="left")  # fmt: skip
        for run in found:
            table.add_row(
                run.name, run.preset or "", run.model or "",
                _differing(run.differing),
                f"{run.epochs_done}/{run.epochs_planned or '?'}", _percent(run.val_accuracy),
                _percent(run.test_accuracy), format_duration(run.seconds), run.state,
            )  # fmt: skip
        console.print(table)


def _differing(settings: dict[str, Any], shown: int = 4) -> str:
    """The first settings in which this run differs from the others listed (all of them: --json)."""
    items = [f"{key}={value}" for key, value in settings.items()]
    return "\n".join(items[:shown] + ([f"(+{len(items) - shown} more)"] if len(items) > shown else []))


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.2%}"


# ---------------------------------------------------------------------------------------------------- sweep


@app.command()
def sweep(
    axes: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="A setting and its values: key=v1,v2,v3, key=range(a,b,step) or key=log(a,b,n) (repeatable; "
            "the Cartesian product is swept; one value: fixed).",
        ),
    ] = None,
    seeds: Annotated[str, typer.Option("--seeds", help="Seeds of every recipe, e.g. 0,1,2.")] = "0",
    samples: Annotated[
        int | None,
        typer.Option("--samples", min=1, help="N seeded random draws from the grid instead of all."),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Sweep folder name (default: the varied keys).")
    ] = None,
    preset: Annotated[
        str | None, typer.Option("--preset", help="The recipe swept around."), Sets("preset")
    ] = None,
    model: Annotated[str | None, typer.Option("--model"), Sets("model.name")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs"), Sets("train.epochs")] = None,
    time_budget: Annotated[
        str | None,
        typer.Option("--time-budget", help="Each trial's budget, e.g. 3m."),
        Sets("train.time_budget"),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            min=1,
            help="Trials at once, each in its own process with the cores split between them (one "
            "GPU each on a machine with several). Default 1: one after another, each with the machine to itself.",
        ),
    ] = 1,
    device: DeviceOption = None,
    processed_dir: ProcessedDirOption = None,
    checkpoint_dir: CheckpointDirOption = None,
    log_dir: LogDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Train a grid (or random draws) of recipes as ordinary runs and rank them on validation accuracy."""
    with handled_errors():
        from cifar_cli import sweep as sweeps
        from cifar_cli.display import make_reporter
        from cifar_cli.engine.train import TrainingInterrupted
        from cifar_cli.engine.train import train as run_training
        from cifar_cli.plots import confusion_matrix_figure, save, sweep_figure

        fixed: dict[str, Any] = {}
        for key, value in flag_settings(sweep, locals()).items():
            set_dotted(fixed, key, value)
        parsed = [sweeps.parse_axis(axis) for axis in axes or []]
        seed_list = [int(part) for part in seeds.split(",") if part.strip().isdigit()]
        if not seed_list or len(seed_list) != len(seeds.split(",")):
            raise SettingsError("Bad option.", [("--seeds", "whole numbers separated by commas", seeds)])
        base = resolve(config, None, flag_settings(sweep, locals()))
        sweep_name = name or sweeps.default_name(parsed)
        trials = sweeps.plan_trials(parsed, seed_list, samples)
        val_images = sweeps.validation_images(base)
        built = sweeps.check_all(
            trials, lambda t: sweeps.trial_settings(t, config, fixed, sweep_name, val_images)
        )
        folder = sweeps.sweep_folder(base, sweep_name)
        console.print(
            f"Sweep {sweep_name}: {len(trials)} trials in {folder}, ranked on {val_images:,} validation images."
        )

        def train_one(settings: Settings) -> None:
            run_training(settings, make_reporter(settings.log.progress, console), confusion_matrix_figure)

        if jobs == 1:
            try:
                summaries = sweeps.run_trials(
                    trials,
                    built,
                    folder,
                    train_one,
                    console.print,
                    lambda rows: console.print(_trial_table(rows)),
                )
            except TrainingInterrupted as error:
                raise TrainingInterrupted(
                    f"Sweep interrupted. {error.message}",
                    hint="Run the same `cifar sweep` command again: finished trials are skipped, this one resumes.",
                ) from None
        else:
            summaries = _parallel_sweep(sweeps, trials, built, folder, jobs, base.train.device)
        ranked = sweeps.rank(trials, summaries)
        sweeps.write_results(folder, ranked)
        varied = [key for key, values in parsed if len(values) > 1]
        document = json.loads((folder / "sweep.json").read_text())
        save(sweep_figure(document["recipes"], varied), folder / "sweep.png")
        _print_sweep(ranked, document, folder)


def _parallel_sweep(
    sweeps: Any, trials: list[Any], built: list[Settings], folder: Path, jobs: int, device: str
) -> dict[str, Any]:
    """--jobs N: trials in their own processes, a live table of all of them; failed trials named with their log."""
    from rich.live import Live

    slots = sweeps.machine_slots(jobs, device)
    gpus = sum(slot.gpu is not None for slot in slots)
    console.print(
        f"{len(slots)} trials at a time, {slots[0].threads} CPU threads each"
        + (f", one GPU each ({gpus} GPUs)" if gpus else "") + f"; trial output in {folder / sweeps.TRIALS_FOLDER}."
    )  # fmt: skip
    with Live(console=console, auto_refresh=False, transient=False) as live:

        def show(rows: list[Any]) -> None:
            live.update(_trial_table(rows), refresh=True)

        try:
            statuses = sweeps.run_parallel(trials, built, folder, slots, show)
        except KeyboardInterrupt:
            from cifar_cli.engine.train import TrainingInterrupted

            raise TrainingInterrupted(
                "Sweep interrupted: every running trial saved its checkpoint.",
                hint="Run the same command again to skip finished trials and resume the others.",
            ) from None
    console.print()  # a live display that is not a terminal ends without a line break
    failed = [status for status in statuses if status.state == "failed"]
    if failed:
        raise CifarError(
            f"{len(failed)} trial(s) failed: "
            + ", ".join(f"{s.trial.name} (log {s.log})" for s in failed)
            + ".",
            hint="Read the logs; the same command again retries them and skips finished trials.",
        )
    return sweeps.summaries_of(folder)


def _trial_table(rows: list[Any]) -> Table:
    """Every trial: the settings that vary, state, epochs, validation and test accuracy, training time."""
    table = Table("trial", "settings", "state", "epochs", "val acc", "test acc", "time", title="Sweep")
    colours = {"running": "cyan", "finished": "green", "failed": "red", "interrupted": "yellow"}
    for row in rows:
        values = " ".join(
            f"{key.split('.')[-1]}={row.trial.values[key]}" for key in (*row.trial.varied, "train.seed")
        )
        epochs = (
            f"{row.epochs_done}/{row.epochs_planned}" if row.epochs_planned else str(row.epochs_done or "")
        )
        table.add_row(
            row.trial.name, values, Text(row.state, style=colours.get(row.state, "")), epochs,
            f"{row.val_accuracy:.2%}" if row.val_accuracy is not None else "",
            f"{row.test_accuracy:.2%}" if row.test_accuracy is not None else "",
            format_duration(row.seconds) if row.seconds else "",
        )  # fmt: skip
    return table


def _print_sweep(ranked: list[Any], document: dict[str, Any], folder: Path) -> None:
    table = Table(
        "rank", "settings", "val accuracy (mean ± std)", "seeds", title="Ranked on validation accuracy"
    )
    for place, recipe in enumerate(ranked, start=1):
        spread = f" ± {recipe.val_std:.2%}" if recipe.val_std is not None else ""
        table.add_row(
            str(place), " ".join(f"{k}={v}" for k, v in recipe.values.items()) or "(fixed)",
            f"{recipe.val_mean:.2%}{spread}" if recipe.val_mean is not None else "not finished", str(len(recipe.trials)),
        )  # fmt: skip
    console.print(table)
    test = document["chosen_test_accuracy_mean"]
    if document["chosen"] is not None and test is not None:
        chosen = " ".join(f"{key}={value}" for key, value in document["chosen"].items())
        console.print(f"Chosen on validation: {chosen}. Its test accuracy, reported once: {test:.2%}.")
    console.print(f"Wrote {folder / 'sweep.csv'}, {folder / 'sweep.json'}, {folder / 'sweep.png'}.")


# ---------------------------------------------------------------------------------------------------- plot


@app.command()
def plot(
    target: Annotated[
        Path | None,
        typer.Argument(help="A run folder (log_dir/<run>) or a checkpoint; default: the latest run."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for the PNG files (default: <run>/plots).")
    ] = None,
    device: DeviceOption = None,
    log_dir: LogDirOption = None,
    checkpoint_dir: CheckpointDirOption = None,
    processed_dir: ProcessedDirOption = None,
    raw_dir: RawDirOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    """Training curves, confusion matrix, per-class accuracy and sample predictions as PNG files."""
    with handled_errors():
        settings = resolve(config, set_options, flag_settings(plot, locals()))
        from cifar_cli.plots import write_run_plots

        written = write_run_plots(
            target,
            out,
            settings.log.log_dir,
            settings.log.checkpoint_dir,
            settings.data,
            settings.train.device,
            say=error_console.print,
        )
        console.print("Wrote:\n" + "\n".join(f"  {path}" for path in written))


# ---------------------------------------------------------------------------------------------------- bench


@app.command()
def bench(
    model: Annotated[str, typer.Option("--model", help="Model for the pipeline comparison.")] = "seed-cnn",
    models: Annotated[
        list[str] | None,
        typer.Option("--models", help="Models for the precision table (default: all; repeatable)."),
    ] = None,
    device: DeviceOption = None,
    batches: Annotated[int, typer.Option("--batches", min=1, help="Timed batches per repeat.")] = 10,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Repeats; medians are reported.")] = 3,
    min_seconds: Annotated[
        float,
        typer.Option("--min-seconds", min=0.0, help="Each timed window runs at least this long (seconds)."),
    ] = 1.0,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Batch size of the pipeline and model rows.")
    ] = 128,
    fast: Annotated[
        bool, typer.Option("--fast/--no-fast", help="Also time the fast preset's real step.")
    ] = True,
    profile: Annotated[
        bool,
        typer.Option(
            "--profile", help="Only profile the fast preset's step: time per operator, utilisation."
        ),
    ] = False,
    export: Annotated[
        bool,
        typer.Option(
            "--export", help="Only inference on the CPU: eager vs .pt2 vs ONNX Runtime, batch 1 and 256."
        ),
    ] = False,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the results to this JSON file.")
    ] = None,
    raw_dir: RawDirOption = None,
    processed_dir: ProcessedDirOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    """Measure training throughput on this machine: our pipeline vs the seed's, fp32 vs mixed precision."""
    with handled_errors():
        settings = resolve(config, set_options, flag_settings(bench, locals()))
        from cifar_cli.bench import BenchOptions, run_benchmark
        from cifar_cli.files import write_text_atomically

        options = BenchOptions(
            model=model,
            device=settings.train.device,
            batches=batches,
            repeats=repeats,
            min_seconds=min_seconds,
            batch_size=batch_size,
            models=tuple(models or ()),
            include_fast=fast,
            keep_freed_memory=settings.train.keep_freed_memory,
        )
        if export:
            from cifar_cli.bench import bench_export_runtimes

            results = bench_export_runtimes(options, say=error_console.print)
            _print_export_runtimes(results)
            if json_file is not None:
                write_text_atomically(json_file, json.dumps(results, indent=2))
            return
        if profile:
            from cifar_cli.bench import profile_fast_step

            results = profile_fast_step(options, settings.data)
            _print_profile(results)
        else:
            results = run_benchmark(options, settings.data, say=error_console.print)
            _print_bench(results)
        if json_file:
            write_text_atomically(json_file, json.dumps(results, indent=2))
            console.print(f"Results written to {json_file}")


def _print_bench(results: dict[str, Any]) -> None:
    machine = results["machine"]
    console.print(
        f"[bold]{machine['device']}[/bold] ({machine['cpu']}, {machine['cpu_capability']}), "
        f"{machine['cpu_count']} CPUs, torch {machine['torch']}"
    )
    ceiling = ", ".join(f"{name} {rate / 1e9:,.0f} GFLOP/s" for name, rate in results["ceiling"].items())
    console.print(f"Ceiling (2048 x 2048 matrix multiply): {ceiling}")
    for decision in results["precision_decisions"]:
        console.print(
            f"{decision['model']}, {decision['optimizer']}, batch {decision['batch_size']}: {decision['summary']}"
        )
    sections = [
        ("Input pipeline (same model, Adam)", results["pipeline"]),
        ("Train step by model", results["models"]),
    ]
    if results["fast_preset"]:
        fast_rows = [
            results["fast_preset"],
            results["fast_preset_system_malloc"],
            results["fast_preset_micro_batches"],
        ]
        sections.append(("fast preset step", [row for row in fast_rows if row]))
    for title, rows in sections:
        table = Table(
            "configuration",
            "batch",
            "images/s",
            "ratio",
            "epoch (50k)",
            "data share",
            "utilisation",
            title=title,
            title_justify="left",
        )
        for row in rows:
            ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
            table.add_row(
                row["name"],
                str(row["batch_size"]),
                f"{row['images_per_second']:,.0f}",
                ratio,
                f"{row['epoch_seconds']:,.0f} s",
                f"{row['data_share']:.0%}",
                f"{row['utilisation']:.0%}" if row["utilisation"] is not None else "-",
            )
        console.print(table)
    per_repeat = results["pipeline_speedup_per_repeat"]
    console.print(
        f"Pipeline speed-up: [bold]{results['pipeline_speedup']:.2f}x[/bold]"
        f" (ratio of medians; per repeat {min(per_repeat):.2f}x to {max(per_repeat):.2f}x)"
    )
    if results["keep_freed_memory_speedup"]:
        speedup = results["keep_freed_memory_speedup"]
        console.print(f"fast preset step, freed memory kept vs malloc defaults: [bold]{speedup:.2f}x[/bold]")


def _print_export_runtimes(results: dict[str, Any]) -> None:
    table = Table(
        "runtime",
        "latency, batch 1",
        "images/s, batch 256",
        title=f"Inference on the CPU: {results['model']}",
    )
    for row in results["rows"]:
        if "skipped" in row:
            table.add_row(row["runtime"], row["skipped"], "")
        else:
            table.add_row(
                row["runtime"],
                f"{row['latency_ms_batch_1']:.2f} ms",
                f"{row['images_per_second_batch_256']:,.0f}",
            )
    console.print(table)


def _print_profile(results: dict[str, Any]) -> None:
    console.print(
        f"fast preset step on {results['machine']['device']} ({results['machine']['cpu']}), {results['choice']}: "
        f"{results['step_seconds']:.2f} s per step under the profiler, {results['images_per_second']:,.0f} images/s"
        + (f", utilisation {results['utilisation']:.0%}" if results["utilisation"] is not None else "")
    )
    table = Table("operator", "calls per step", "self seconds per step", "share", title="By self time")
    for row in results["operators"]:
        table.add_row(
            row["name"], str(row["calls"]), f"{row['self_seconds_per_step']:.3f}", f"{row['share']:.1%}"
        )
    console.print(table)


def main() -> None:
    app(prog_name="cifar")

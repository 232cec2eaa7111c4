"""`cifar train`: one run (or, with --nproc, one run of N processes under torchrun), and `--dry-run` plans."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cifar_cli.cli.common import (
    RECIPE,
    RUN,
    CheckpointDirOption,
    ConfigOption,
    DatasetOption,
    DeviceOption,
    LogDirOption,
    ProcessedDirOption,
    RawDirOption,
    SetOption,
    Sets,
    console,
    flag_settings,
    resolve,
)
from cifar_cli.config.sections import MODEL_RECIPES, LogSettings, OptimSettings, SchedulerSettings, TrainSettings
from cifar_cli.config.settings import Settings, available_presets, choices
from cifar_cli.errors import UsageError
from cifar_cli.runtime import stopping


def train(
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help=f"One of: {', '.join(available_presets())} (default fast; with --time-budget, the highest of "
            "fast, balanced, accurate that fits).",
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
            + "; or torchvision:NAME, any of torchvision's classifiers (recipe baseline). Without --preset, the "
            "model's own recipe.",
            rich_help_panel=RECIPE,
        ),
        Sets("model.name"),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            help="torchvision:NAME only: start from pretrained weights: default, a named set (IMAGENET1K_V1) or a "
            "state dict file. torchvision downloads each once into torch's hub cache.",
            rich_help_panel=RECIPE,
        ),
        Sets("model.weights"),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="Epochs to train.", rich_help_panel=RECIPE), Sets("train.epochs")
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
            "--scheduler", help=f"One of: {', '.join(choices(SchedulerSettings, 'name'))}.", rich_help_panel=RECIPE
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
            "--precision", help=f"One of: {', '.join(choices(TrainSettings, 'precision'))}.", rich_help_panel=RUN
        ),
        Sets("train.precision"),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option("--seed", help="Seeds every random number generator.", rich_help_panel=RUN),
        Sets("train.seed"),
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            "--seeds",
            help="Train several seeds in this one process, each a run of its own: 0-9 or 0,3,7; ends with the "
            "mean +- std of the test accuracy and the training time (also as JSON).",
            rich_help_panel=RUN,
        ),
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
            "--resume/--no-resume", help="Continue from last.pth (default: when it exists).", rich_help_panel=RUN
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
        typer.Option("--progress", help=f"One of: {', '.join(choices(LogSettings, 'progress'))}.", rich_help_panel=RUN),
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
            "Picks the epochs, and a narrower model if one epoch does not fit; without --preset or --model, also "
            "the recipe (fast, balanced, accurate) whose whole schedule fits.",
            rich_help_panel=RECIPE,
        ),
        Sets("train.time_budget"),
    ] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            help="Fine-tune: start from this checkpoint's weights (same model; a new head where the classes differ).",
            rich_help_panel=RECIPE,
        ),
        Sets("train.init_from"),
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(
            "--teacher",
            help="Distil: blend this trained checkpoint's (or export's) logits into the loss "
            "(train.distill.alpha, train.distill.temperature).",
            rich_help_panel=RECIPE,
        ),
        Sets("train.distill.teacher"),
    ] = None,
    freeze_epochs: Annotated[
        int | None,
        typer.Option(
            "--freeze-epochs",
            help="With --init-from or --weights: epochs that train the head only.",
            rich_help_panel=RECIPE,
        ),
        Sets("train.freeze_epochs"),
    ] = None,
    class_weights: Annotated[
        str | None,
        typer.Option(
            "--class-weights",
            help="none, or auto: the loss weights each class by its inverse frequency (imbalanced data).",
            rich_help_panel=RECIPE,
        ),
        Sets("train.class_weights"),
    ] = None,
    balanced_sampler: Annotated[
        bool | None,
        typer.Option(
            "--balanced-sampler",
            help="Batches draw every class equally often (with replacement).",
            rich_help_panel=RECIPE,
        ),
        Sets("train.balanced_sampler"),
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
    flags = flag_settings(train, locals())
    settings = resolve(config, set_options, flags)
    if seeds is not None:
        from cifar_cli.train.seeds import parse_seeds

        seed_list = parse_seeds(seeds)  # a bad list is refused before anything runs, a dry run too
        if seed is not None or nproc > 1:
            what = "--seed" if seed is not None else "--nproc"
            raise UsageError(f"--seeds trains every seed in this process: give it without {what}.")
    if "optim.lr" in flags or any(option.split("=")[0].strip() == "optim.lr" for option in set_options or []):
        from cifar_cli.recipe.optim import what_lr_reaches

        if note := what_lr_reaches(settings.optim):
            console.print(note, style="yellow")
    if dry_run:
        from cifar_cli.train.run import plan_run
        from cifar_cli.ui.display import PlainReporter

        plan_run(settings, PlainReporter(console))  # prints the measured speeds and the plan
        console.print("Dry run: nothing was trained.")
        return
    if nproc > 1:
        from cifar_cli.runtime.device import check_launch

        check_launch(settings.train.device, nproc)  # the same short error as without --nproc
        raise typer.Exit(launch_torchrun(nproc))
    from cifar_cli.train.run import train as run_training
    from cifar_cli.ui.display import make_reporter
    from cifar_cli.ui.plots import confusion_matrix_figure

    def train_one(each: Settings) -> Any:
        return run_training(each, make_reporter(each.log.progress, console), confusion_matrix_figure)

    if seeds is None:
        train_one(settings)
        return
    from cifar_cli.train.seeds import train_seeds

    print_seeds(train_seeds(settings, seed_list, train_one, console.print))


def launch_torchrun(nproc: int) -> int:
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
    options = ["--standalone", f"--nproc_per_node={nproc}", "-m", "cifar_cli", *args]
    console.print("Launching: torch.distributed.run " + " ".join(options))
    # torchrun in a process group of its own, which this process passes stop signals on to: its workers save and
    # stop. torchrun itself ignores SIGUSR1/2 (a SLURM job's warning), which would otherwise kill it at once.
    command = [sys.executable, "-c", TORCHRUN_IGNORING_WARNINGS, *options]
    process = subprocess.Popen(command, env=os.environ.copy(), start_new_session=True)
    with stopping.forwarded_to_process_tree(process):
        return process.wait()


TORCHRUN_IGNORING_WARNINGS = (
    "import signal; signal.signal(signal.SIGUSR1, signal.SIG_IGN); signal.signal(signal.SIGUSR2, signal.SIG_IGN); "
    "from torch.distributed.run import main; main()"
)


def _number(value: float | None, form: str) -> str:
    return "" if value is None else format(value, form)


def print_seeds(summary: Any) -> None:
    """`--seeds`: each seed's run, then the mean and standard deviation (a train/seeds.py SeedsSummary)."""
    table = Table("seed", "run", "test accuracy", "train s", "wall s", title="Seeds", title_justify="left")
    table.columns[1].no_wrap = True
    for run in summary.runs:
        table.add_row(
            str(run.seed),
            run.run_name,
            _number(run.accuracy, ".2%"),
            _number(run.train_seconds, ".1f"),
            _number(run.wall_seconds, ".1f"),
        )
    console.print(table)
    accuracy, train, wall = (summary.stats(key) for key in ("accuracy", "train_seconds", "wall_seconds"))
    parts = [
        f"test accuracy {accuracy[0]:.2%} +- {accuracy[1]:.2%}" if accuracy else "",
        f"training {train[0]:.1f} +- {train[1]:.1f} s" if train else "",
        f"each run's command {wall[0]:.1f} +- {wall[1]:.1f} s" if wall else "",
    ]
    scored = sum(run.accuracy is not None for run in summary.runs)  # a run interrupted earlier has no final score
    console.print(f"Mean +- std of {scored} seeds: {', '.join(part for part in parts if part)}.")
    console.print(f"Written to {summary.path}")

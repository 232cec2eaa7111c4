"""`cifar bench`: training throughput on this machine (pipelines, precisions, the fast preset's step), the fast
step's profile, or the inference runtimes of an export; tables that fit an 80-column terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cifar_cli.cli.common import (
    ConfigOption,
    DeviceOption,
    ProcessedDirOption,
    RawDirOption,
    SetOption,
    console,
    error_console,
    flag_settings,
    resolve,
)
from cifar_cli.errors import CifarError


def bench(
    model: Annotated[str, typer.Option("--model", help="Model for the pipeline comparison.")] = "seed-cnn",
    models: Annotated[
        list[str] | None, typer.Option("--models", help="Models for the precision table (default: all; repeatable).")
    ] = None,
    device: DeviceOption = None,
    batches: Annotated[int, typer.Option("--batches", min=1, help="Timed batches per repeat.")] = 10,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Repeats; medians are reported.")] = 3,
    min_seconds: Annotated[
        float, typer.Option("--min-seconds", min=0.0, help="Each timed window runs at least this long (seconds).")
    ] = 1.0,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Batch size of the pipeline and model rows.")
    ] = 128,
    fast: Annotated[bool, typer.Option("--fast/--no-fast", help="Also time the fast preset's real step.")] = True,
    profile: Annotated[
        bool, typer.Option("--profile", help="Only profile the fast preset's step: time per operator, utilisation.")
    ] = False,
    export: Annotated[
        bool,
        typer.Option("--export", help="Only inference on the CPU: eager vs .pt2 vs ONNX Runtime, batch 1 and 256."),
    ] = False,
    recalibrate: Annotated[
        bool,
        typer.Option(
            "--recalibrate",
            help="Only forget every cached speed (what `cifar train` plans with) and measure --model's (and the "
            "fast preset's) again.",
        ),
    ] = False,
    vs_record: Annotated[
        bool,
        typer.Option(
            "--vs-record",
            help="Only the CIFAR-10 speed records (airbench94_muon; hiverge's where beside it) against `cifar train "
            "--preset fast` on this GPU, --runs times each: accuracy and seconds over the same span.",
        ),
    ] = False,
    runs: Annotated[int, typer.Option("--runs", min=1, help="--vs-record: timed runs of each program.")] = 5,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only",
            help="--vs-record: run only this program (airbench94_muon, fast or hiverge; repeatable). Default: all.",
        ),
    ] = None,
    anchors: Annotated[
        Path | None,
        typer.Option(
            "--anchors",
            help="--vs-record: folder with airbench94_muon.py, and hiverge_cifar10_speedrun.py if you have it "
            "(default: ../shared/anchors).",
        ),
    ] = None,
    from_json: Annotated[
        Path | None, typer.Option("--from-json", help="--vs-record: show a recorded --json result, run nothing.")
    ] = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="Write the results to this JSON file.")] = None,
    raw_dir: RawDirOption = None,
    processed_dir: ProcessedDirOption = None,
    config: ConfigOption = None,
    set_options: SetOption = None,
) -> None:
    """Measure training throughput on this machine: our pipeline vs the seed's, fp32 vs mixed precision."""
    settings = resolve(config, set_options, flag_settings(bench, locals()))
    from cifar_cli.bench import BenchOptions, run_benchmark
    from cifar_cli.files import write_text_atomically

    if recalibrate:
        from cifar_cli.bench import recalibrate as measure_again

        for line in measure_again(model, batch_size, settings.train.device, fast):
            console.print(line)
        return
    if vs_record or from_json is not None:
        document = _vs_record(settings, runs, anchors, from_json, json_file, only)
        print_vs_record(document)
        if json_file is not None and from_json is None:
            console.print(f"Results written to {json_file}")
        if document["failed"] and from_json is None:
            raise CifarError(f"{', '.join(document['failed'])} failed; the table holds what was measured.")
        return
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
        print_export_runtimes(results)
        if json_file is not None:
            write_text_atomically(json_file, json.dumps(results, indent=2))
        return
    if profile:
        from cifar_cli.bench import profile_fast_step

        results = profile_fast_step(options, settings.data)
        print_profile(results)
    else:
        results = run_benchmark(options, settings.data, say=error_console.print)
        print_bench(results)
    if json_file:
        write_text_atomically(json_file, json.dumps(results, indent=2))
        console.print(f"Results written to {json_file}")


def _vs_record(
    settings: Any,
    runs: int,
    anchors: Path | None,
    from_json: Path | None,
    json_file: Path | None,
    only: list[str] | None,
) -> dict[str, Any]:
    from cifar_cli.bench.record import compare_with_record, find_anchors, read_side_by_side
    from cifar_cli.files import write_text_atomically

    def save(document: dict[str, Any]) -> None:  # after each program: a comparison cut short keeps what it measured
        if json_file is not None:
            write_text_atomically(json_file, json.dumps(document, indent=2))

    if from_json is not None:
        return read_side_by_side(from_json)
    folder = find_anchors(anchors, (Path.cwd(), Path(__file__).parents[2]))
    workdir = (settings.log.log_dir / "vs-record").absolute()
    return compare_with_record(
        folder, settings.data, settings.train.device, runs, list(range(runs)), workdir, error_console.print, save, only
    )


def print_vs_record(document: dict[str, Any]) -> None:
    """One row per program: final TTA accuracy, the span, its warm-up and the whole wall; 80 columns wide."""
    machine, programs = document["machine"], document["programs"]
    counts = {result["accuracy"]["n"] for result in programs}
    each = f": {counts.pop()} timed runs each" if len(counts) == 1 else ""
    title = f"Side by side on {machine.get('gpu', '?')}, torch {machine.get('torch', '?')}{each}"
    table = Table(title=title, title_justify="left")
    table.add_column("program", overflow="fold", min_width=15, ratio=1)
    for header in ("TTA acc. %", "span s", "warm-up s", "wall s"):
        table.add_column(header, justify="right", no_wrap=True)
    for result in programs:
        accuracy, span = result["accuracy"], result["span"]
        table.add_row(
            result["name"] + ("" if each else f" ({accuracy['n']} runs)"),
            f"{100 * accuracy['mean']:.2f} ± {100 * accuracy['std']:.2f}",
            f"{span['mean']:.2f} ({span['min']:.2f}-{span['max']:.2f})",
            f"{result['warmup_seconds']:.0f}",
            f"{result['wall_seconds']:.0f}",
        )
    console.print(table)
    for name, message in document["failed"].items():
        console.print(f"{name} failed; its output ends:\n{message}", markup=False, highlight=False)
    if not document["time_ratios"]:
        console.print("fast was not measured, so there is no ratio.")
        return
    # Documents written before fast was timed both ways hold one set of ratios, of the cold runs.
    by_program = document.get("ratios_by_program") or {"fast": document["time_ratios"]}
    for program, ratios in by_program.items():
        if not ratios:
            continue
        said = "; ".join(f"{ratio:.2f}x {name}'s" for name, ratio in ratios.items())
        console.print(
            f"{program} takes {said} seconds over the same span (model init with whitening, training steps, "
            "final TTA; mean of the timed runs)."
        )


def print_bench(results: dict[str, Any]) -> None:
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
    sections = [("Input pipeline (same model, Adam)", results["pipeline"]), ("Train step by model", results["models"])]
    if results["fast_preset"]:
        fast_rows = [results["fast_preset"], results["fast_preset_system_malloc"], results["fast_preset_micro_batches"]]
        sections.append(("fast preset step", [row for row in fast_rows if row]))
    for title, rows in sections:
        console.print(speed_table(title, rows))
    per_repeat = results["pipeline_speedup_per_repeat"]
    console.print(
        f"Pipeline speed-up: [bold]{results['pipeline_speedup']:.2f}x[/bold]"
        f" (ratio of medians; per repeat {min(per_repeat):.2f}x to {max(per_repeat):.2f}x)"
    )
    if results["keep_freed_memory_speedup"]:
        speedup = results["keep_freed_memory_speedup"]
        console.print(f"fast preset step, freed memory kept vs malloc defaults: [bold]{speedup:.2f}x[/bold]")


def speed_table(title: str, rows: list[dict[str, Any]]) -> Table:
    """One row per configuration: images/s, the ratio to the table's first row, a 50,000-image epoch, the share
    of time spent waiting for data and the share of the machine's matrix-multiply ceiling reached."""
    table = Table(title=title, title_justify="left")
    table.add_column("configuration", overflow="fold", ratio=1)
    for header in ("batch", "img/s", "ratio", "epoch", "data", "util"):
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(
            row["name"],
            str(row["batch_size"]),
            f"{row['images_per_second']:,.0f}",
            f"{row['ratio']:.2f}x" if row["ratio"] else "-",
            f"{row['epoch_seconds']:,.0f} s",
            f"{row['data_share']:.0%}",
            f"{row['utilisation']:.0%}" if row["utilisation"] is not None else "-",
        )
    return table


def print_export_runtimes(results: dict[str, Any]) -> None:
    table = Table(
        "runtime", "latency, batch 1", "images/s, batch 256", title=f"Inference on the CPU: {results['model']}"
    )
    for row in results["rows"]:
        if "skipped" in row:
            table.add_row(row["runtime"], row["skipped"], "")
        else:
            table.add_row(
                row["runtime"], f"{row['latency_ms_batch_1']:.2f} ms", f"{row['images_per_second_batch_256']:,.0f}"
            )
    console.print(table)


def print_profile(results: dict[str, Any]) -> None:
    console.print(
        f"fast preset step on {results['machine']['device']} ({results['machine']['cpu']}), {results['choice']}: "
        f"{results['step_seconds']:.3f} s per step under the profiler, {results['images_per_second']:,.0f} images/s"
        + (f", utilisation {results['utilisation']:.0%}" if results["utilisation"] is not None else "")
    )
    on_gpu = results.get("device_seconds_per_step") is not None
    if on_gpu:
        console.print(
            f"The GPU ran kernels and copies {1000 * results['device_seconds_per_step']:.2f} ms of each step "
            f"({results['device_busy_share']:.0%} of it, under the profiler, which slows the host)."
        )
    table = Table(title="By self time on the GPU" if on_gpu else "By self time", title_justify="left")
    table.add_column("operator", overflow="fold", ratio=1)
    headers = (
        ("calls per step", "host ms", "GPU ms", "share") if on_gpu else ("calls per step", "self s per step", "share")
    )
    for header in headers:
        table.add_column(header, justify="right", no_wrap=True)
    for row in results["operators"]:
        if on_gpu:
            times = [f"{1000 * row['self_seconds_per_step']:.2f}", f"{1000 * row['device_seconds_per_step']:.2f}"]
        else:
            times = [f"{row['self_seconds_per_step']:.3f}"]
        table.add_row(row["name"], str(row["calls"]), *times, f"{row['share']:.1%}")
    console.print(table)

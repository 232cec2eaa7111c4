"""`cifar bench --vs-record`: the CIFAR-10 speed records (airbench94_muon, and hiverge's cifar10-speedrun where it
is beside it; each run as its authors wrote it) and `cifar train --preset fast` on the same GPU in the same hour,
each N times, timed over the same span.

The span is the records' own (CUDA events there, a synchronised clock here): model initialisation with the
whitening filters, the training steps, the final TTA evaluation; per-epoch evaluation and compilation excluded.
A record pays compilation in an untimed warm-up run on random labels; ours runs an untimed warm-up seed. Every
warm-up and every whole command are timed by the wall clock and reported apart.

The records are never copied into the project: they are read from `../shared/anchors/` (or `--anchors DIR`, or
$CIFAR_ANCHORS) and run from a temporary copy whose only change is its number of runs (200 -> N). Both load the
same files (cifar10/{train,test}.pt in their working folder), written from our prepared cache.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_cli.bench.ours import OURS_NAME, OURS_WARM_NAME, run_ours, run_ours_warm
from cifar_cli.bench.programs import ProgramResult, run_logged, summarise
from cifar_cli.errors import UsageError

__all__ = ["ProgramResult", "summarise"]  # kept where a reader of --vs-record looks for them

RECORD_SCRIPT = "airbench94_muon.py"  # required: the record `fast` follows


@dataclass(frozen=True)
class RecordProgram:
    name: str
    script: str  # in the anchors folder
    source: str  # where it comes from, for the reader of the table


RECORDS = (
    RecordProgram("airbench94_muon", RECORD_SCRIPT, "KellerJordan/cifar10-airbench at f1c599c"),
    # Measured where it is beside the first (94.01% in 2.015 s on an A100, its README).
    RecordProgram("hiverge", "hiverge_cifar10_speedrun.py", "hiverge/cifar10-speedrun at 5cd49b1"),
)
ANCHORS_ENV = "CIFAR_ANCHORS"
RECORD_RUNS_LINE = "for run in range(200)"  # the record's own run count, the one line its copy changes
OURS_KEY = "fast"  # what --only calls ours (warm and cold)
HOW_TO_GET = (
    "Pass --anchors DIR: a folder with airbench94_muon.py (KellerJordan/cifar10-airbench at f1c599c, MIT), as "
    "../shared/anchors/ holds it; or set CIFAR_ANCHORS."
)


def find_anchors(explicit: Path | None = None, search_from: tuple[Path, ...] = ()) -> Path:
    """The folder with the record: `explicit`, else $CIFAR_ANCHORS, else the first
    `shared/anchors` beside any parent of the `search_from` folders (a checkout sits next to shared/)."""
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(explicit)
    elif os.environ.get(ANCHORS_ENV):
        candidates.append(Path(os.environ[ANCHORS_ENV]))
    else:
        for start in search_from:
            for folder in (start.resolve(), *start.resolve().parents):
                candidates.append(folder / "shared" / "anchors")
    for folder in candidates:
        if (folder / RECORD_SCRIPT).is_file():
            return folder
    where = ", ".join(str(c) for c in candidates[:3]) + (" ..." if len(candidates) > 3 else "")
    raise UsageError(f"The speed record ({RECORD_SCRIPT}) is not in {where or 'any folder'}.", hint=HOW_TO_GET)


def records_in(anchors: Path) -> list[RecordProgram]:
    """The record programs present in `anchors` (airbench94_muon always is: find_anchors checked it)."""
    return [program for program in RECORDS if (anchors / program.script).is_file()]


def chosen_programs(anchors: Path, only: list[str] | None) -> tuple[list[RecordProgram], bool]:
    """The records in `anchors` to run and whether to run ours (`fast`): all of them, or the names in `only`
    (airbench94_muon, fast, hiverge). A name that is unknown or whose script is not in `anchors` stops the
    comparison before anything runs: a lent GPU's minutes are not spent on a typo."""
    present = records_in(anchors)
    if not only:
        return present, True
    known = [RECORDS[0].name, OURS_KEY, *(program.name for program in RECORDS[1:])]  # in the order they run
    unknown = [name for name in only if name not in known]
    if unknown:
        raise UsageError(
            f"--only {', '.join(unknown)}: not a program --vs-record runs.", hint=f"Choose from {', '.join(known)}."
        )
    missing = [p.script for p in RECORDS if p.name in only and p not in present]
    if missing:
        raise UsageError(f"--only asks for {', '.join(missing)}, which is not in {anchors}.", hint=HOW_TO_GET)
    return [program for program in present if program.name in only], OURS_KEY in only


def record_copy(source: str, runs: int, script: str = RECORD_SCRIPT) -> str:
    """A record's text with its 200 timed runs cut to `runs`: the only change made to it."""
    if source.count(RECORD_RUNS_LINE) != 1:
        raise UsageError(
            f"{script} is not the expected version: '{RECORD_RUNS_LINE}' was not found once.", hint=HOW_TO_GET
        )
    return source.replace(RECORD_RUNS_LINE, f"for run in range({runs})")


def parse_record_output(text: str) -> tuple[list[dict[str, float]], dict[str, float] | None]:
    """The record's table: (each timed run's final TTA accuracy and time_seconds, the warm-up's), from rows
    `| run | epoch | train_acc | val_acc | tta_val_acc | time_seconds |` whose epoch is `eval`."""
    runs: list[dict[str, float]] = []
    warmup, current = None, None
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 6 or cells[0] == "run":
            continue
        current = cells[0] or current
        if cells[1] != "eval":
            continue
        entry = {"accuracy": float(cells[4]), "seconds": float(cells[5])}
        if current == "warmup":
            warmup = entry
        else:
            runs.append(entry)
    return runs, warmup


def write_record_data(processed_dir: Path, workdir: Path) -> None:
    """The images `cifar train` reads (our prepared cache), in the files the record loads from its working folder:
    cifar10/{train,test}.pt, dicts of uint8 N x 32 x 32 x 3 `images`, int64 `labels` and `classes`. Both programs
    then see the same pixels."""
    import torch

    from cifar_cli.data.prepare import load_cache, read_spec

    cache, names = load_cache(processed_dir), list(read_spec(processed_dir).class_names)
    folder = workdir / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        images = cache[f"{split}_images"].permute(0, 2, 3, 1).contiguous()
        torch.save({"images": images, "labels": cache[f"{split}_labels"], "classes": names}, folder / f"{split}.pt")


def run_record(
    program: RecordProgram, anchors: Path, runs: int, workdir: Path, say: Callable[[str], None]
) -> ProgramResult:
    """A record's copy with `runs` timed runs, in `workdir` (where write_record_data put the images)."""
    script = workdir / f"{Path(program.script).stem}_{runs}_runs.py"
    script.write_text(record_copy((anchors / program.script).read_text(), runs, program.script))
    started = time.perf_counter()
    output = run_logged([sys.executable, str(script)], workdir, say, script.with_suffix(".log"))
    wall = time.perf_counter() - started
    timed, warmup = parse_record_output(output)
    if len(timed) != runs or warmup is None:
        raise UsageError(f"{program.script} printed {len(timed)} of {runs} runs; its output ends:\n{output[-1500:]}")
    return ProgramResult(
        program.name,
        f"python {program.script} (200 -> {runs} runs; {program.source})",
        [r["accuracy"] for r in timed],
        [r["seconds"] for r in timed],
        warmup["seconds"],
        wall,
    )


def side_by_side(
    records: list[ProgramResult],
    ours: list[ProgramResult] | ProgramResult | None,
    machine: dict[str, Any],
    failed: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The JSON document `--json` writes and `--from-json` reads back: every program measured so far, each of ours
    (warm, cold) over each record in seconds of the same span (means of the timed runs), `time_ratios` those of
    the first of ours measured (warm, as the records are timed), and the programs that failed with the end of
    their output."""
    mine = [ours] if isinstance(ours, ProgramResult) else list(ours or [])
    ratios = {
        program.name: {
            r.name: statistics.fmean(program.span_seconds) / statistics.fmean(r.span_seconds) for r in records
        }
        for program in mine
    }
    return {
        "machine": machine,
        "programs": [program.to_json() for program in [*records, *mine]],
        "time_ratios": ratios[mine[0].name] if mine else {},
        "ratios_by_program": ratios,
        "failed": dict(failed or {}),
    }


def read_side_by_side(path: Path) -> dict[str, Any]:
    """A document written by `--vs-record --json`, checked enough to render (one of before hiverge's record too:
    `record`, `ours` and `time_ratio`)."""
    try:
        document = json.loads(path.read_text())
        if "programs" not in document:
            name = document["record"]["name"]
            document["programs"] = [document["record"], document["ours"]]
            document["time_ratios"] = {name: document["time_ratio"]}
        for program in document["programs"]:
            program["accuracy"]["mean"], program["span"]["mean"], program["name"]  # noqa: B018 - presence
        document["time_ratios"].items()  # noqa: B018 - presence
        document.setdefault("failed", {})
        return document
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UsageError(f"{path} is not a `cifar bench --vs-record --json` result ({type(error).__name__}).") from None


def compare_with_record(
    anchors: Path,
    data: Any,
    device_name: str,
    runs: int,
    seeds: list[int],
    workdir: Path,
    say: Callable[[str], None],
    save: Callable[[dict[str, Any]], None] = lambda _document: None,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """airbench94_muon, then `fast`, then the other records in `anchors` (or those of them named in `only`), on this
    machine's GPU, on the same prepared data (`data`, DataSettings); `save(document)` after each program."""
    import torch

    from cifar_cli.data import ensure_prepared
    from cifar_cli.runtime.device import resolve_device

    chosen, run_fast = chosen_programs(anchors, only)
    if resolve_device(device_name).type != "cuda":
        raise UsageError(
            "--vs-record needs a CUDA GPU: the records run only there.",
            hint="Run it on a GPU machine; --from-json FILE shows a recorded result anywhere.",
        )
    ensure_prepared(data, say)
    write_record_data(data.processed_dir, workdir / "record")
    machine = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    # Each program's result is kept (and `save`d) as soon as it is measured, and one that fails does not stop the
    # others; the record `fast` follows runs first, then `fast`, then any other record: on a lent GPU with minutes
    # to spare, a comparison cut short still holds the pair that matters most.
    records: list[ProgramResult] = []
    failed: dict[str, str] = {}
    ours: list[ProgramResult] = []

    def measure(name: str, run: Callable[[], ProgramResult]) -> ProgramResult | None:
        try:
            return run()
        except UsageError as error:
            say(f"{name} failed: {error.message}")
            failed[name] = error.message[-1500:]
            return None

    def record(program: RecordProgram) -> None:
        result = measure(program.name, lambda: run_record(program, anchors, runs, workdir / "record", say))
        records.extend([result] if result is not None else [])
        save(side_by_side(records, ours, machine, failed))

    for program in (p for p in chosen if p.script == RECORD_SCRIPT):
        record(program)
    if run_fast:  # warm first (timed as the records are), then cold (as a single `cifar train` is)
        train_args = ["--processed-dir", str(data.processed_dir.absolute())]
        for name, run in ((OURS_WARM_NAME, run_ours_warm), (OURS_NAME, run_ours)):
            result = measure(name, lambda run=run: run(seeds, train_args, workdir / "ours", say))
            ours.extend([result] if result is not None else [])
            save(side_by_side(records, ours, machine, failed))
    for program in (p for p in chosen if p.script != RECORD_SCRIPT):
        record(program)
    return side_by_side(records, ours, machine, failed)

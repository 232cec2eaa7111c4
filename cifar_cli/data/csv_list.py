"""Read a CSV list of labelled images (what annotation tools export) into the same scan as an image folder.

Columns: `path` (relative to the CSV's folder, or to `root`, or absolute) and `label` (any text; the classes are
the labels in sorted order, numerically where every label is a whole number), and an optional `split` (train or
test; without it a seeded, stratified `test_fraction` of each class is held out, as for a folder). Rows are
numbered as a spreadsheet shows them: the header is row 1.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from cifar_cli.data.folder import FolderScan, ImageFile, hold_out, refuse_colliding
from cifar_cli.errors import UsageError

REQUIRED_COLUMNS = ("path", "label")
SPLITS = ("train", "test")
ROWS_SHOWN = 8  # rows named in one error; the rest are counted


@dataclass(frozen=True)
class Row:
    number: int  # as a spreadsheet shows it (the header is row 1)
    path: Path
    label: str
    split: str | None


def scan_csv(csv_file: Path, test_fraction: float, root: Path | None = None, skip_missing: bool = False) -> FolderScan:
    """The classes and image files a CSV lists. Empty labels, unknown splits, test labels without training rows
    and repeated paths are refused with their rows; missing files too, unless `skip_missing` (then counted)."""
    base = (root or csv_file.parent).resolve()
    rows = _read_rows(csv_file, base)
    _refuse_rows([row for row in rows if not row.label], "have an empty label", csv_file)
    _refuse_rows(
        [row for row in rows if row.split == ""],
        "leave the split empty",
        csv_file,
        hint="With a split column, every row names train or test (or drop the column to hold out a test share).",
    )
    _refuse_rows(
        [row for row in rows if row.split not in (None, *SPLITS)], "have a split other than train or test", csv_file
    )
    _refuse_repeats(rows, csv_file)
    missing = [row for row in rows if not row.path.is_file()]
    if not skip_missing:
        _refuse_rows(missing, "name files that do not exist", csv_file, hint=_missing_hint(base, root))
    kept = [row for row in rows if row.path.is_file()]
    names = _class_names(kept, csv_file)
    label_of = {name: index for index, name in enumerate(names)}
    if rows[0].split is not None:  # the CSV has a split column (every row then names one)
        files = {split: [ImageFile(r.path, label_of[r.label]) for r in kept if r.split == split] for split in SPLITS}
        if not files["test"]:
            raise UsageError(f"{csv_file} has a split column but no row in the test split.")
        return FolderScan(base, "csv-split", names, files, len(missing))
    by_class = [[ImageFile(r.path, label_of[r.label]) for r in kept if r.label == name] for name in names]
    train, test = hold_out(by_class, test_fraction)
    return FolderScan(base, "csv", names, {"train": train, "test": test}, len(missing))


def _read_rows(csv_file: Path, base: Path) -> list[Row]:
    if not csv_file.is_file():
        raise UsageError(f"No CSV file at {csv_file}.", hint="Pass a file with the columns path and label.")
    try:
        text = csv_file.read_text(encoding="utf-8-sig")  # the byte-order mark spreadsheets write is not a column
    except UnicodeDecodeError as error:
        raise UsageError(f"{csv_file} is not UTF-8 text (byte {error.object[error.start]:#04x}).") from None
    reader = csv.DictReader(text.splitlines())
    columns = [name.strip().lower() for name in reader.fieldnames or []]
    absent = [name for name in REQUIRED_COLUMNS if name not in columns]
    if absent:
        raise UsageError(
            f"{csv_file} lacks the column{'s' if len(absent) > 1 else ''} {', '.join(absent)} "
            f"(its header: {', '.join(columns) or 'empty'}).",
            hint="The first line names the columns: path,label (and optionally split).",
        )
    reader.fieldnames = columns
    rows = []
    for number, record in enumerate(reader, start=2):
        path = Path((record.get("path") or "").strip())
        split = record.get("split")
        rows.append(
            Row(
                number,
                path if path.is_absolute() else base / path,
                (record.get("label") or "").strip(),
                # A short row has no split at all (None from the reader): empty, as a blank cell is.
                (split or "").strip().lower() if "split" in columns else None,
            )
        )
    if not rows:
        raise UsageError(f"{csv_file} lists no images.")
    return rows


def _class_names(rows: list[Row], csv_file: Path) -> list[str]:
    """Sorted labels (numerically when all are whole numbers); every test label needs training rows."""
    labels = {row.label for row in rows}
    key = (lambda label: int(label)) if all(label.isdigit() for label in labels) else None
    names = sorted(labels, key=key)
    if len(names) < 2:
        raise UsageError(f"A classifier needs at least two labels; {csv_file} has {len(names)} ({', '.join(names)}).")
    refuse_colliding(names)
    trained = {row.label for row in rows if row.split in (None, "train")}
    _refuse_rows(
        [row for row in rows if row.label not in trained],
        "have a label that no training row has",
        csv_file,
        hint="Every test label needs training images.",
    )
    return names


def _refuse_repeats(rows: list[Row], csv_file: Path) -> None:
    seen: dict[Path, int] = {}
    repeats = []
    for row in rows:
        if row.path in seen:
            repeats.append(row)
        seen.setdefault(row.path, row.number)
    _refuse_rows(
        repeats,
        "list an image that an earlier row lists",
        csv_file,
        hint="List each image once: one image in two rows would be trained (or tested) twice.",
    )


def _refuse_rows(rows: list[Row], problem: str, csv_file: Path, hint: str | None = None) -> None:
    if not rows:
        return
    shown = "\n".join(
        f"  row {row.number}: {row.path}" + (f" ({row.label})" if row.label else "") for row in rows[:ROWS_SHOWN]
    )
    more = f"\n  ... and {len(rows) - ROWS_SHOWN} more" if len(rows) > ROWS_SHOWN else ""
    what = "1 row" if len(rows) == 1 else f"{len(rows)} rows"
    raise UsageError(f"{what} of {csv_file} {_verb(problem, len(rows))}:\n{shown}{more}", hint=hint)


def _verb(problem: str, count: int) -> str:
    """'have' / 'name' / 'list' read for one row as 'has' / 'names' / 'lists'."""
    if count > 1:
        return problem
    first, _, rest = problem.partition(" ")
    return {"have": "has"}.get(first, first + "s") + " " + rest


def _missing_hint(base: Path, root: Path | None) -> str:
    relative_to = f"--root {base}" if root is not None else f"the CSV's folder {base}"
    return f"Relative paths are read from {relative_to}. Fix those rows, or pass --skip-bad-images to leave them out."

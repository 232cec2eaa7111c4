"""What `cifar bench --vs-record` keeps of each program it times (the records, and `fast` cold and warm), and how
it runs one: a process whose output goes to a log as it comes."""

from __future__ import annotations

import os
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_cli.errors import UsageError


def summarise(values: list[float]) -> dict[str, float | int]:
    """n, mean, sample std (0 for one value), min and max."""
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


@dataclass(frozen=True)
class ProgramResult:
    name: str
    command: str
    accuracies: list[float]  # final TTA test accuracy of each timed run, fractions
    span_seconds: list[float]  # each timed run's init + training + final TTA, seconds
    warmup_seconds: float  # the untimed warm-up (the record's includes its torch.compile)
    wall_seconds: float  # the timed runs' whole command(s), by the wall clock

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "command": self.command,
            "accuracies": self.accuracies,
            "span_seconds": self.span_seconds,
            "warmup_seconds": self.warmup_seconds,
            "wall_seconds": self.wall_seconds,
            "accuracy": summarise(self.accuracies),
            "span": summarise(self.span_seconds),
        }


def run_logged(command: list[str], cwd: Path, say: Callable[[str], None], log: Path) -> str:
    """`command` in `cwd`, its output (stdout and stderr) written to `log` as it comes: a comparison stopped from
    outside (a lent machine's time limit) still shows how far each program got. Returns the stdout."""
    say(f"$ {' '.join(command)}  (output: {log})")
    with (
        log.open("w") as sink,
        subprocess.Popen(
            command,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        ) as process,
    ):
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            sink.write(line)
            sink.flush()
    stdout = "".join(lines)
    if process.returncode != 0:
        raise UsageError(f"{' '.join(command[:4])} ... failed (exit {process.returncode}):\n{log.read_text()[-1500:]}")
    return stdout

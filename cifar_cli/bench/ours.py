"""`cifar train --preset fast` timed beside the speed records, both ways a user meets it: cold (one command per
run, as a single `cifar train` is) and warm (every seed in one process after an untimed warm-up seed, as the
records time their runs after a warm-up run in theirs)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cifar_cli.bench.programs import ProgramResult, run_logged

OURS_NAME = "cifar train --preset fast (cold)"
OURS_WARM_NAME = "cifar train --preset fast --seeds (warm)"
WARMUP_SEED = 1000  # our untimed warm-up run (allocator, kernels loaded, a GPU's kernel choices)


def _train_command(device: str, run_name: str, workdir: Path, seeds: list[int], extra: list[str]) -> list[str]:
    chosen = ["--seed", str(seeds[0])] if len(seeds) == 1 else ["--seeds", ",".join(map(str, seeds))]
    return [sys.executable, "-m", "cifar_cli", "train", "--preset", "fast", "--device", device, *chosen,
            "--run-name", run_name, "--no-resume", "--progress", "plain", "--log-dir", str(workdir / "runs"),
            "--checkpoint-dir", str(workdir / "checkpoints"), *extra]  # fmt: skip


def _final(workdir: Path, run_name: str) -> dict:
    return json.loads((workdir / "runs" / run_name / "final_metrics.json").read_text())


def run_ours(
    seeds: list[int], train_args: list[str], workdir: Path, say: Callable[[str], None], device: str = "cuda"
) -> ProgramResult:
    """Cold: once untimed (warm-up), then once per seed; each a new process."""
    workdir.mkdir(parents=True, exist_ok=True)  # the processes' working folder: runs/ and checkpoints/ go in it
    accuracies, spans, wall, warmup = [], [], 0.0, 0.0
    for seed in [WARMUP_SEED, *seeds]:
        name = f"vs-record-seed{seed}"
        started = time.perf_counter()
        run_logged(_train_command(device, name, workdir, [seed], train_args), workdir, say, workdir / f"{name}.log")
        seconds = time.perf_counter() - started
        final = _final(workdir, name)
        if seed == WARMUP_SEED:
            warmup = seconds
            continue
        wall += seconds
        accuracies.append(final["accuracy"])
        spans.append(final["record_span_seconds"])
    command = f"cifar train --preset fast --device {device} --seed S (a process each)"
    return ProgramResult(OURS_NAME, command, accuracies, spans, warmup, wall)


def run_ours_warm(
    seeds: list[int], train_args: list[str], workdir: Path, say: Callable[[str], None], device: str = "cuda"
) -> ProgramResult:
    """Warm: one `cifar train --seeds` process, its first seed the untimed warm-up."""
    workdir.mkdir(parents=True, exist_ok=True)
    name = "vs-record-warm"
    every = [WARMUP_SEED, *seeds]
    started = time.perf_counter()
    run_logged(_train_command(device, name, workdir, every, train_args), workdir, say, workdir / f"{name}.log")
    wall = time.perf_counter() - started
    finals = [_final(workdir, f"{name}-seed{seed}") for seed in every]
    warmup = finals[0]["wall_seconds"]  # the warm-up seed's own run, set-up to final evaluation
    command = f"cifar train --preset fast --device {device} --seeds {WARMUP_SEED},0-{len(seeds) - 1} (one process)"
    return ProgramResult(
        OURS_WARM_NAME,
        command,
        [final["accuracy"] for final in finals[1:]],
        [final["record_span_seconds"] for final in finals[1:]],
        warmup,
        wall - warmup,
    )

"""What an Optuna study of `cifar sweep --storage` draws from and where it lives: the search space from `--set`,
the samplers (a grid in the local backend's order, seeded random draws, TPE), the pruners, and the storage."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_cli.errors import UsageError
from cifar_cli.sweep.axes import LOG, RANGE, cartesian, exact_step, parse_axis

OPEN_ATTEMPTS = 4  # tries to open a database storage (several workers may be creating its tables)
SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "halving", "hyperband")
PRUNE_REDUCTION = 3  # successive halving / Hyperband keep the best third at each rung
FIRST_ATTR = "cifar:first_number"  # system attribute of a retry: the number of the trial it continues


@dataclass(frozen=True)
class Dimension:
    """One swept setting. `values` is what a grid visits; random and TPE draw from `low`..`high` (on a log scale
    for `log(a,b,n)`, in `step`s for `range(a,b,step)`) or, for a list, from its values."""

    key: str
    values: tuple[Any, ...]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    def suggest(self, trial: Any) -> Any:
        if self.low is None:
            return trial.suggest_categorical(self.key, list(self.values))
        if all(isinstance(v, int) for v in (self.low, self.high, self.step or 1)):
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


def parse_dimension(assignment: str) -> Dimension:
    key, values = parse_axis(assignment)
    text = assignment.partition("=")[2].strip()
    if len(values) < 2:
        return Dimension(key, tuple(values))
    # Optuna draws from low up to high: a descending range (`range(10,0,-3)`, `log(1,0.01,3)`) is the same set
    # of values from its smallest up, while a grid still visits them in the order written.
    low, high = min(values[0], values[-1]), max(values[0], values[-1])
    if LOG.match(text):
        return Dimension(key, tuple(values), low, high, log=True)
    if RANGE.match(text):
        step = abs(exact_step(values[0], values[1]))
        return Dimension(key, tuple(values), low, high, step=step)
    return Dimension(key, tuple(values))


def space_text(dimensions: list[Dimension]) -> str:
    """What a study stores about its space, so that a worker with other `--set` values is refused."""
    return "; ".join(
        f"{d.key}="
        + (",".join(map(str, d.values)) if d.low is None else f"{d.low}..{d.high} log={d.log} step={d.step}")
        for d in dimensions
    )


# ------------------------------------------------------------------------------------------------ Optuna parts


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UsageError(
            "--storage needs Optuna, which is not installed.", hint="pip install 'cifar-cli[optuna]'"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
    return optuna


def open_storage(url: str) -> Any:
    """An RDB URL (sqlite:///study.db, postgresql://user@host/db, mysql://...) or a journal file path
    (`study.journal`, for a shared disk without a database server)."""
    optuna = require_optuna()
    if url.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql"):
        # SQLite: writers wait for each other's locks (seconds) instead of failing at once.
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        for attempt in range(OPEN_ATTEMPTS):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
            except Exception as error:  # noqa: BLE001 - SQLAlchemy's many errors, one message
                # Workers started together (a SLURM array) race to create a new database's tables; the loser
                # finds them made when it tries again.
                if attempt == OPEN_ATTEMPTS - 1:
                    raise UsageError(f"Cannot open the study storage {url}: {error}") from None
                time.sleep(1.0 + random.random())
    if url.endswith((".journal", ".log")):
        path = Path(url).expanduser()
        if not path.parent.is_dir():
            raise UsageError(f"No folder {path.parent} for the journal file {path}.")
        journal = optuna.storages.journal
        return optuna.storages.JournalStorage(journal.JournalFileBackend(str(path)))
    raise UsageError(
        f"Unknown storage {url!r}.",
        hint="Give an SQLite/PostgreSQL/MySQL URL (sqlite:///sweep.db) or a journal file path (sweep.journal).",
    )


def make_sampler(kind: str, grid: list[dict[str, Any]], seed: int) -> Any:
    optuna = require_optuna()
    if kind == "grid":
        return GridInOrder(grid)
    if kind == "random":
        return NumberSeededRandom(seed)
    # Several workers draw at once: constant_liar keeps them off each other's running trials; the seed differs
    # per process, or workers started together would draw the same first trials.
    salt = int(hashlib.sha256(f"{socket.gethostname()}:{os.getpid()}".encode()).hexdigest()[:6], 16)
    return optuna.samplers.TPESampler(seed=seed * 1_000_003 + salt, constant_liar=True)


def make_pruner(kind: str, epochs: int) -> Any:
    pruners = require_optuna().pruners
    if kind == "halving":
        return pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=PRUNE_REDUCTION)
    if kind == "hyperband":
        return pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=PRUNE_REDUCTION)
    return pruners.NopPruner()


def fresh_index(study: Any, number: int) -> int:
    """The trial's place among the study's first attempts (retries excluded): the grid point it trains. Trial
    numbers are handed out by the storage, so two workers never get the same place."""
    trials = study.get_trials(deepcopy=False)
    return sum(1 for t in trials if t.number < number and FIRST_ATTR not in t.system_attrs)


class GridInOrder:
    """Grid points in the local backend's order, one per first attempt, wherever the worker runs."""

    def __new__(cls, grid: list[dict[str, Any]]) -> Any:
        base = require_optuna().samplers.BaseSampler

        class _Grid(base):
            def infer_relative_search_space(self, study: Any, trial: Any) -> dict:
                return {}

            def sample_relative(self, study: Any, trial: Any, space: dict) -> dict:
                return {}

            def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> Any:
                index = fresh_index(study, trial.number)
                if index >= len(grid):
                    raise GridExhausted(index)
                return grid[index][name]

        return _Grid()


class NumberSeededRandom:
    """Uniform (or log-uniform) draws seeded by (seed, trial number, setting): a study is the same sequence of
    recipes however many workers draw it."""

    def __new__(cls, seed: int) -> Any:
        samplers = require_optuna().samplers

        class _Random(samplers.BaseSampler):
            def infer_relative_search_space(self, study: Any, trial: Any) -> dict:
                return {}

            def sample_relative(self, study: Any, trial: Any, space: dict) -> dict:
                return {}

            def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> Any:
                digest = hashlib.sha256(f"{seed}:{trial.number}:{name}".encode()).hexdigest()
                draw = samplers.RandomSampler(seed=int(digest[:8], 16))
                return draw.sample_independent(study, trial, name, distribution)

        return _Random()


class GridExhausted(Exception):
    """A worker asked for a trial after the last grid point was handed out (two workers at the same instant)."""


def grid_points(dimensions: list[Dimension]) -> list[dict[str, Any]]:
    return cartesian([(d.key, d.values) for d in dimensions])


def describe_dimension(dimension: Dimension, sampler: str) -> str:
    if sampler == "grid" or dimension.low is None:
        return f"{dimension.key} in {list(dimension.values)}"
    scale = (
        "log-uniform" if dimension.log else ("in steps of " + f"{dimension.step:g}" if dimension.step else "uniform")
    )
    return f"{dimension.key} {scale} from {dimension.low:g} to {dimension.high:g}"

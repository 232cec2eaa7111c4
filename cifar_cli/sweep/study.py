"""`cifar sweep --storage URL`: trials drawn by Optuna from a study that any number of `cifar sweep` processes, on
any machines, share through its storage (an SQLite file, a journal file on a shared disk, PostgreSQL or MySQL).

Each trial is an ordinary run under `<log_dir>/sweeps/<study>/`, named and ranked as the local backend names and
ranks them. A worker that dies mid-trial (kill -9, a lost node) is noticed by the others: at once on the same host
(its process is gone), after `STALE_SECONDS` without a heartbeat elsewhere; its trial is failed and queued again
with the same settings, under the same run name, so the next worker resumes it from its last checkpoint. A trial
is counted once: the failed attempt is never ranked. Optuna is optional (`pip install 'cifar-cli[optuna]'`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from cifar_cli.errors import SettingsError, UsageError
from cifar_cli.files import process_alive, write_text_atomically
from cifar_cli.runs import list_runs
from cifar_cli.sweep.grid import Trial, trial_label
from cifar_cli.sweep.space import FIRST_ATTR, Dimension, GridExhausted, fresh_index, require_optuna
from cifar_cli.train.tracking import PRUNED_FILE

HEARTBEAT_SECONDS = 20.0  # how often a running trial says it is alive
STALE_SECONDS = 300.0  # a trial on another host silent this long is taken as dead (clocks agree within seconds)
WORKER_ATTR = "cifar:worker"  # user attribute of a running trial: host, pid, last heartbeat (Unix seconds)
SPACE_ATTR = "cifar:space"  # study user attribute: the search space it was created with
RECIPE_ATTR = "cifar:recipe"  # study user attribute: the fixed settings its trials share (study_recipe)


class Pruned(Exception):
    def __init__(self, epoch: int) -> None:
        super().__init__(f"pruned after epoch {epoch}")
        self.epoch = epoch


# ------------------------------------------------------------------------------------------------ dead workers


def worker_record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "beat": time.time()}


def is_dead(trial: Any, now: float, host: str) -> bool:
    """A running trial whose worker is gone: its process no longer runs on this host, or it has been silent for
    STALE_SECONDS (a trial not yet heard from counts from its start)."""
    worker = trial.user_attrs.get(WORKER_ATTR)
    if worker is None:
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return now - started > STALE_SECONDS
    if worker["host"] == host:
        return not process_alive(int(worker["pid"]))
    return now - float(worker["beat"]) > STALE_SECONDS


def retry_dead_trials(study: Any, now: float | None = None, host: str | None = None) -> list[int]:
    """Fail every running trial whose worker is dead and queue it again with the same settings, reports and
    pruning progress; returns the numbers of the trials taken over. Two workers may see the same dead trial:
    the storage lets only one of them fail it, and only that one queues the retry."""
    optuna = require_optuna()
    state = optuna.trial.TrialState
    now, host = now or time.time(), host or socket.gethostname()
    retried = []
    for trial in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        if not is_dead(trial, now, host):
            continue
        try:
            if not study._storage.set_trial_state_values(trial._trial_id, state=state.FAIL):
                continue
        except Exception:  # noqa: BLE001 - another worker failed it first (UpdateFinishedTrialError, a lock)
            continue
        queue_retry(study, trial)
        retried.append(trial.number)
    return retried


def queue_retry(study: Any, trial: Any) -> None:
    optuna = require_optuna()
    user_attrs = {key: value for key, value in trial.user_attrs.items() if key != WORKER_ATTR}
    system_attrs = {**trial.system_attrs, FIRST_ATTR: trial.system_attrs.get(FIRST_ATTR, trial.number)}
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=user_attrs,
            system_attrs=system_attrs,
            intermediate_values=trial.intermediate_values,
        )
    )


@contextmanager
def heartbeat(trial: Any, seconds: float = HEARTBEAT_SECONDS) -> Iterator[None]:
    """The trial's worker record, written now and every `seconds` until the trial ends (a thread)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(seconds):
            try:
                trial.set_user_attr(WORKER_ATTR, worker_record())
            except Exception:  # noqa: BLE001 - a storage hiccup; the next beat tries again
                pass

    trial.set_user_attr(WORKER_ATTR, worker_record())
    thread = threading.Thread(target=beat, name="cifar-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ------------------------------------------------------------------------------------------------ the worker


@dataclass
class StudyPlan:
    """What a worker needs: the space, how many trials the study runs, and how each is turned into a run."""

    dimensions: list[Dimension]
    fixed: dict[str, Any]  # one-value --set keys and the seed
    trials: int
    timeout: float | None  # seconds after which this worker starts no new trial


def open_study(storage: Any, name: str, sampler: Any, pruner: Any, space: str, recipe: dict[str, Any]) -> Any:
    """The study `name` (made when new); a worker whose search space or fixed recipe differs from the study's is
    refused, so that every trial of a study answers the same question."""
    optuna = require_optuna()
    study = optuna.create_study(
        storage=storage, study_name=name, direction="maximize", sampler=sampler, pruner=pruner, load_if_exists=True
    )
    stored = study.user_attrs.get(SPACE_ATTR)
    if stored is None:
        study.set_user_attr(SPACE_ATTR, space)
    elif stored != space:
        raise SettingsError(
            f"Study {name!r} was created with another search space.", [("--set", f"the study's: {stored}", space)]
        )
    stored_recipe = study.user_attrs.get(RECIPE_ATTR)
    if stored_recipe is None:
        study.set_user_attr(RECIPE_ATTR, recipe)
    elif stored_recipe != recipe:
        keys = sorted(key for key in {*stored_recipe, *recipe} if stored_recipe.get(key) != recipe.get(key))
        raise SettingsError(
            f"Study {name!r} was created with other fixed settings: its trials answer another question.",
            [(key, f"the study's: {stored_recipe.get(key)!r}", repr(recipe.get(key))) for key in keys[:12]],
            hint="Give this study a new --name, or run this worker with the study's settings.",
        )
    return study


def study_recipe(settings: Any, varied: list[str]) -> dict[str, Any]:
    """What every trial of a study shares: the settings that make a result (train/identity.py) but the varied
    ones, and the length (epochs, or the time budget that chooses them), as JSON-safe values."""
    from cifar_cli.train.identity import recipe_identity

    identity = recipe_identity(settings.to_plain())
    shared = {key: value for key, value in identity.items() if key not in varied}
    shared["train.epochs"], shared["train.time_budget"] = settings.train.epochs, settings.train.time_budget
    return json.loads(json.dumps(shared))


def counted(study: Any) -> tuple[int, int]:
    """(trials that took a place in the study: finished, pruned, running or queued; queued retries)."""
    state = require_optuna().trial.TrialState
    trials = study.get_trials(deepcopy=False)
    places = sum(t.state in (state.COMPLETE, state.PRUNED, state.RUNNING, state.WAITING) for t in trials)
    return places, sum(t.state == state.WAITING for t in trials)


def run_worker(
    study: Any,
    plan: StudyPlan,
    train_trial: Callable[[Trial, Callable[[int, float | None], None]], dict[str, Any]],
    say: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, int]:
    """Ask for trials until the study has `plan.trials` (or `plan.timeout` passed), taking over dead workers'
    trials first; returns how many trials this worker finished, pruned and took over."""
    started, done = clock(), {"finished": 0, "pruned": 0, "taken over": 0}
    while plan.timeout is None or clock() - started < plan.timeout:
        for number in retry_dead_trials(study):
            say(f"Trial {number}'s worker is gone: queued again, to resume from its last checkpoint.")
        places, queued = counted(study)
        if not queued and places >= plan.trials:
            break
        trial = study.ask()
        with heartbeat(trial):
            outcome = _run_one(study, trial, plan, train_trial, say)
        if outcome == "surplus":  # every grid point is handed out (one lost to an error is not drawn again)
            break
        done[outcome] += 1
        done["taken over"] += FIRST_ATTR in frozen(study, trial).system_attrs
    return done


def frozen(study: Any, trial: Any) -> Any:
    """The stored state of a trial in progress (its system attributes: a retry's first number, the pruner's)."""
    return study._storage.get_trial(trial._trial_id)


def _run_one(study: Any, trial: Any, plan: StudyPlan, train_trial: Callable, say: Callable[[str], None]) -> str:
    from cifar_cli.train.run import TrainingInterrupted

    optuna = require_optuna()
    try:
        values = {d.key: d.suggest(trial) for d in plan.dimensions}
    except GridExhausted:
        trial.set_user_attr("cifar:surplus", True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return "surplus"
    stored = frozen(study, trial)
    first = stored.system_attrs.get(FIRST_ATTR, trial.number)
    # The place among first attempts names the run (t000, t001, ... as the local backend's grid order); a retry
    # keeps its first attempt's place, so it resumes that run folder.
    place = stored.user_attrs.get("place", fresh_index(study, first))
    values = {**values, **plan.fixed}
    varied = tuple(d.key for d in plan.dimensions)
    name = f"t{place:03d}_{trial_label(values, varied)}"[:120]
    trial.set_user_attr("run", name)
    trial.set_user_attr("place", place)
    say(f"Trial {trial.number} ({name})" + (f", continuing trial {first}" if first != trial.number else ""))

    # A retry trained again from scratch (its checkpoint out of reach) would report these epochs a second time.
    inherited = set(stored.intermediate_values)

    def report(epoch: int, val_accuracy: float | None) -> None:
        if val_accuracy is None or epoch in inherited:
            return
        trial.report(val_accuracy, epoch)
        if trial.should_prune():
            raise Pruned(epoch)

    try:
        result = train_trial(Trial(place, values, varied, name), report)
    except Pruned as pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        say(f"Trial {trial.number} pruned after epoch {pruned.epoch}.")
        return "pruned"
    except (KeyboardInterrupt, TrainingInterrupted):  # its checkpoint is saved: the next worker resumes it
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        queue_retry(study, frozen(study, trial))
        raise
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    for key, value in result.items():
        trial.set_user_attr(key, value)
    study.tell(trial, result["val_accuracy"])
    return "finished"


def trial_runner(
    build: Callable[[Trial], Any], train: Callable[[Any, Callable[[dict[str, Any]], None]], Any]
) -> Callable[[Trial, Callable[[int, float | None], None]], dict[str, Any]]:
    """What `run_worker` calls for each trial: its settings from `build(trial)` (as the local backend builds them),
    trained by `train(settings, on_epoch)`, each epoch's validation accuracy reported to the pruner; a pruned run's
    folder says so. Returns the run's numbers, read back as `cifar runs` reads them."""

    def run(trial: Trial, report: Callable[[int, float | None], None]) -> dict[str, Any]:
        settings = build(trial)
        folder = settings.log.log_dir
        try:
            train(settings, lambda record: report(record["epoch"], record.get("val_accuracy")))
        except Pruned as pruned:
            text = json.dumps({"epoch": pruned.epoch, "by": "the sweep's pruner"})
            write_text_atomically(folder / trial.name / PRUNED_FILE, text)
            raise
        summary = next(run for run in list_runs(folder) if run.name == trial.name)
        if summary.val_accuracy is None:
            raise UsageError(f"Trial {trial.name} has no validation accuracy to rank it by.")
        return {
            "val_accuracy": summary.val_accuracy,
            "test_accuracy": summary.test_accuracy,
            "seconds": summary.seconds,
            "epochs": summary.epochs_done,
        }

    return run


# ------------------------------------------------------------------------------------------------ results


def study_results(study: Any) -> tuple[list[Trial], dict[str, Any], list[dict[str, Any]]]:
    """The study's finished trials as the local backend's trials and run summaries (for `sweep.rank`), read from
    the storage so that every machine's trials are ranked; and the pruned ones."""
    state = require_optuna().trial.TrialState
    trials, summaries, pruned = [], {}, []
    for record in study.get_trials(deepcopy=False):
        name = record.user_attrs.get("run")
        if name is None:
            continue
        place = record.user_attrs.get("place", record.number)
        if record.state == state.COMPLETE:
            trials.append(Trial(place, dict(record.params), tuple(record.params), name))
            summaries[name] = SimpleNamespace(
                val_accuracy=record.value, test_accuracy=record.user_attrs.get("test_accuracy")
            )
        elif record.state == state.PRUNED:
            epochs = max(record.intermediate_values, default=0)
            pruned.append(
                {"run": name, **record.params, "epochs": epochs, "val_accuracy": record.intermediate_values.get(epochs)}
            )
    return sorted(trials, key=lambda t: t.index), summaries, pruned

"""`cifar sweep --storage`: Optuna studies shared by worker processes (SQLite, journal file, PostgreSQL), with a
pruner, and a worker killed with kill -9 whose trial another worker resumes."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
from cifar_cli.sweep import space  # noqa: E402
from cifar_cli.sweep import study as studies  # noqa: E402 - after the skip: the module needs Optuna at work
from tests.conftest import flat, run_cli  # noqa: E402


def _args(tmp_path: Path, prepared_dir: Path, storage: str, lrs: str, epochs: int, *extra: str) -> list[str]:
    return [
        "sweep", "--preset", "baseline", "--set", f"optim.lr={lrs}", "--epochs", str(epochs), "--device", "cpu",
        "--name", "lr", "--processed-dir", str(prepared_dir), "--log-dir", str(tmp_path / "runs"),
        "--checkpoint-dir", str(tmp_path / "ck"), "--set", "train.batch_size=16", "--set", "train.precision=fp32",
        "--set", "train.num_threads=1", "--set", "log.progress=plain", "--storage", storage, *extra,
    ]  # fmt: skip


def _worker(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "cifar_cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=log.parent, env=env)  # fmt: skip


def _trials(storage: str) -> list:
    return optuna.load_study(study_name="lr", storage=space.open_storage(storage)).get_trials()


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, f"the worker ended (exit {process.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_a_killed_workers_trial_is_resumed_by_the_next_and_a_hopeless_one_pruned(
    tmp_path: Path, prepared_dir: Path
) -> None:
    """Worker A is killed with -9 after its first trial's first checkpoint; worker B, started after, fails that
    trial, resumes it from the checkpoint under the same run name (not a new one: each grid point runs once), then
    trains the second grid point, which successive halving prunes after its first epoch (lr 1e-9 learns nothing).
    """
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = _args(tmp_path, prepared_dir, storage, "0.003,1e-9", 12, "--pruner", "halving")
    first = tmp_path / "ck" / "sweeps" / "lr" / "t000_lr0.003_seed0"
    a = _worker(args, tmp_path / "a.log")
    _wait_for(first / "last.pth", a)
    os.kill(a.pid, signal.SIGKILL)
    a.wait()  # reaped: a zombie would still answer kill(pid, 0)
    runs = tmp_path / "runs" / "sweeps" / "lr"
    assert not (runs / first.name / "final_metrics.json").exists(), "A finished before it was killed"
    b = subprocess.run([sys.executable, "-m", "cifar_cli", *args], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert b.returncode == 0, b.stdout + b.stderr
    assert "Trial 0's worker is gone" in b.stdout and f"Resuming run {first.name} after epoch" in b.stdout

    states = [(t.number, t.state.name, t.user_attrs.get("run")) for t in _trials(storage)]
    assert states == [
        (0, "FAIL", first.name),  # A's attempt: never ranked
        (1, "COMPLETE", first.name),  # B's resume of it
        (2, "PRUNED", "t001_lr1e-09_seed0"),
    ], states
    history = json.loads((runs / first.name / "history.json").read_text())
    assert [record["epoch"] for record in history] == list(range(1, 13))  # every epoch once, across both workers
    pruned = json.loads((runs / "t001_lr1e-09_seed0" / "pruned.json").read_text())
    assert pruned["epoch"] == 1

    document = json.loads((runs / "sweep.json").read_text())
    assert document["chosen"] == {"optim.lr": 0.003} and [r["trials"] for r in document["recipes"]] == [first.name]
    assert document["recipes"][0]["val_accuracy_mean"] == pytest.approx(history[-1]["val_accuracy"])
    assert [row["run"] for row in document["pruned"]] == ["t001_lr1e-09_seed0"]
    assert (runs / "sweep.csv").read_text().count("\n") == 2 and (runs / "sweep.png").stat().st_size > 10_000
    listed = run_cli("runs", "--log-dir", str(tmp_path / "runs"), "--json")
    states_listed = {run["name"]: run["state"] for run in json.loads(listed.output)}
    assert states_listed == {first.name: "finished", "t001_lr1e-09_seed0": "pruned"}


def test_two_workers_on_a_journal_file_run_each_grid_point_once(tmp_path: Path, prepared_dir: Path) -> None:
    _two_workers_run_each_grid_point_once(tmp_path, prepared_dir, str(tmp_path / "study.journal"))


def _two_workers_run_each_grid_point_once(tmp_path: Path, prepared_dir: Path, storage: str) -> None:
    """Two worker processes started together on one study: three grid points, each trained exactly once."""
    args = _args(tmp_path, prepared_dir, storage, "0.004,0.002,0.001", 3)
    workers = [_worker(args, tmp_path / f"{name}.log") for name in "ab"]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    # Both workers may ask for a trial in the same instant after the last point is handed out: the one that finds
    # the grid exhausted records a failed "surplus" trial with no run (what the sweep's results skip) and stops.
    everything = _trials(storage)
    trials = [t for t in everything if not t.user_attrs.get("cifar:surplus")]
    assert len(everything) - len(trials) <= len(workers) and all(
        t.state.name == "FAIL" for t in everything if t not in trials
    )
    assert sorted(t.user_attrs["run"] for t in trials) == [
        "t000_lr0.004_seed0", "t001_lr0.002_seed0", "t002_lr0.001_seed0"
    ]  # fmt: skip
    assert {t.state.name for t in trials} == {"COMPLETE"}
    # Between them the workers trained each point once (two private studies would train six). Which worker
    # trained what is up to timing: a worker that starts a second late may find every short trial taken.
    logs = "".join((tmp_path / f"{name}.log").read_text() for name in "ab")
    assert sorted(re.findall(r"^Trial \d+ \((\S+)\)", logs, re.MULTILINE)) == [
        "t000_lr0.004_seed0", "t001_lr0.002_seed0", "t002_lr0.001_seed0"
    ], logs  # fmt: skip
    runs = tmp_path / "runs" / "sweeps" / "lr"
    with (runs / "sweep.csv").open() as handle:
        assert handle.read().count("\n") == 4  # written by the last worker to end: the whole study


def test_postgresql_storage(tmp_path: Path, prepared_dir: Path) -> None:
    """A throwaway PostgreSQL server on a Unix socket, where the machine has one (Debian's postgresql package;
    as root, the server runs as the `postgres` user, since initdb refuses root)."""
    pytest.importorskip("psycopg2")
    as_user = _server_user()
    binaries = [shutil.which(name) for name in ("initdb", "pg_ctl")]
    if not all(binaries) or as_user is None:
        pytest.skip("no PostgreSQL server binaries, or root without a postgres user to run them as")
    home = Path(tempfile.mkdtemp(prefix="cifar-pg-"))  # outside pytest's root-only tmp folders
    data, sockets = home / "data", home / "sock"
    sockets.mkdir()
    if as_user:
        shutil.chown(home, as_user)
        shutil.chown(sockets, as_user)
    prefix = ["runuser", "-u", as_user, "--"] if as_user else []
    port = _free_port()
    options = f"-k {sockets} -p {port} -c listen_addresses=''"
    subprocess.run([*prefix, binaries[0], "-D", str(data), "-A", "trust", "-U", "cifar"], check=True,
                   capture_output=True)  # fmt: skip
    # The server's output to a log file: a pipe would stay open (the server holds it) and the wait never end.
    subprocess.run([*prefix, binaries[1], "-D", str(data), "-o", options, "-l", str(home / "log"), "-w", "start"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)  # fmt: skip
    try:
        _two_workers_run_each_grid_point_once(
            tmp_path, prepared_dir, f"postgresql+psycopg2://cifar@/postgres?host={sockets}&port={port}"
        )
    finally:
        subprocess.run([*prefix, binaries[1], "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)  # fmt: skip
        shutil.rmtree(home, ignore_errors=True)


def _server_user() -> str | None:
    """ "" to run the server as ourselves, "postgres" as root, None where root has no such user."""
    if os.geteuid() != 0:
        return ""
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    return "postgres" if shutil.which("runuser") else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------------------------------ in one process


def _memory_study(sampler: object = None) -> object:
    return optuna.create_study(direction="maximize", sampler=sampler)


def test_a_dead_workers_trial_is_queued_again_once_with_its_reports() -> None:
    study = _memory_study()
    distributions = {"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    trial = study.ask(distributions)
    trial.report(0.4, 1)
    trial.set_user_attr("run", "t000_lr0.01_seed0")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial.set_user_attr(studies.WORKER_ATTR, {"host": socket.gethostname(), "pid": dead.pid, "beat": time.time()})
    alive = study.ask(distributions)
    alive.set_user_attr(studies.WORKER_ATTR, studies.worker_record())

    assert studies.retry_dead_trials(study) == [0]
    assert studies.retry_dead_trials(study) == []  # counted once
    first, running, retry = study.get_trials()
    assert (first.state.name, running.state.name, retry.state.name) == ("FAIL", "RUNNING", "WAITING")
    assert retry.params == first.params and retry.intermediate_values == {1: 0.4}
    assert retry.system_attrs[space.FIRST_ATTR] == 0 and retry.user_attrs["run"] == "t000_lr0.01_seed0"
    assert studies.WORKER_ATTR not in retry.user_attrs  # the old worker's record would look dead at once
    assert study.ask().number == 2  # the next worker gets the retry first


def test_silence_counts_as_death_only_on_other_hosts_and_after_the_grace_period() -> None:
    study = _memory_study()
    trial = study.ask()
    now = time.time()
    trial.set_user_attr(studies.WORKER_ATTR, {"host": "elsewhere", "pid": 1, "beat": now - 10})
    stored = study.get_trials()[0]
    assert not studies.is_dead(stored, now, "here")
    assert studies.is_dead(stored, now + studies.STALE_SECONDS, "here")
    trial.set_user_attr(studies.WORKER_ATTR, {"host": "here", "pid": os.getpid(), "beat": now - 10**6})
    assert not studies.is_dead(study.get_trials()[0], now, "here")  # its process runs: alive, however quiet


def test_grid_points_in_order_and_random_draws_the_same_for_every_worker() -> None:
    dimensions = [
        space.parse_dimension("optim.lr=log(0.001,0.1,3)"),
        space.parse_dimension("train.batch_size=range(16,64,16)"),
    ]
    assert dimensions[0].log and (dimensions[0].low, dimensions[0].high) == (0.001, 0.1)
    assert (dimensions[1].low, dimensions[1].high, dimensions[1].step) == (16, 48, 16)
    grid = space.grid_points(dimensions)
    study = _memory_study(space.make_sampler("grid", grid, 0))
    drawn = []
    for _ in grid:
        trial = study.ask()
        drawn.append({d.key: d.suggest(trial) for d in dimensions})
        study.tell(trial, 0.5)
    assert drawn == grid
    with pytest.raises(space.GridExhausted):
        dimensions[0].suggest(study.ask())

    def draws(seed: int) -> list[tuple]:
        study = _memory_study(space.make_sampler("random", grid, seed))
        values = []
        for _ in range(4):
            trial = study.ask()
            values.append(tuple(d.suggest(trial) for d in dimensions))
            study.tell(trial, 0.5)
        return values

    assert draws(0) == draws(0) != draws(1)
    assert all(0.001 <= lr <= 0.1 and batch in (16, 32, 48) for lr, batch in draws(0))


@pytest.mark.parametrize("sampler", ["grid", "random"])
def test_a_descending_range_is_drawn_from_its_values(sampler: str) -> None:
    """`range(10,0,-3)` (the local grid's 10, 7, 4, 1) once crashed inside Optuna (low above high)."""
    dimensions = [space.parse_dimension("train.epochs=range(10,0,-3)"), space.parse_dimension("optim.lr=log(1,0.01,3)")]
    grid = space.grid_points(dimensions)
    study = _memory_study(space.make_sampler(sampler, grid, 0))
    drawn = []
    for _ in range(len(grid) if sampler == "grid" else 6):
        trial = study.ask()
        drawn.append({d.key: d.suggest(trial) for d in dimensions})
        study.tell(trial, 0.5)
    assert all(point["train.epochs"] in (10, 7, 4, 1) and 0.01 <= point["optim.lr"] <= 1 for point in drawn)
    if sampler == "grid":
        assert drawn == grid and [point["train.epochs"] for point in grid[::3]] == [10, 7, 4, 1]


def test_options_a_study_cannot_honour_are_refused(tmp_path: Path, prepared_dir: Path) -> None:
    storage = f"sqlite:///{tmp_path / 's.db'}"
    base = _args(tmp_path, prepared_dir, storage, "0.003,0.001", 1)
    for extra, field in (
        (["--seeds", "0,1"], "--seeds"),
        (["--samples", "2"], "--samples"),
        (["--jobs", "2"], "--jobs"),
        (["--sampler", "bayes"], "--sampler"),
        (["--sampler", "random"], "--trials"),
        (["--trials", "3"], "--trials"),
    ):
        result = run_cli(*base, *extra)
        assert result.exit_code == 2 and field in result.output, (extra, result.output)
    local = run_cli(*[*base[: base.index("--storage")], "--pruner", "halving"])
    assert local.exit_code == 2 and "need --storage" in local.output
    unknown = run_cli(*[*base[:-1], "ftp://somewhere"])
    assert unknown.exit_code == 2 and "Unknown storage" in unknown.output
    assert run_cli(*base).exit_code == 0
    other = run_cli(*_args(tmp_path, prepared_dir, storage, "0.01,0.02", 1))
    assert other.exit_code == 2 and "another search space" in other.output
    # The same space with another length or fixed setting would rank trials that answer different questions.
    for changed, key in ((_args(tmp_path, prepared_dir, storage, "0.003,0.001", 2), "train.epochs"),
                         ([*base, "--set", "optim.momentum=0.5"], "optim.momentum")):  # fmt: skip
        result = run_cli(*changed)
        assert result.exit_code == 2 and "other fixed settings" in flat(result.output), result.output
        assert key in result.output


def test_a_grid_worker_stops_when_the_grid_is_handed_out_even_after_an_error() -> None:
    """A grid point lost to an error (failed, not retried) is not drawn again, and the worker ends instead of
    asking for trials past the grid forever."""
    dimensions = [space.parse_dimension("optim.lr=0.1,0.2")]
    study = _memory_study(space.make_sampler("grid", space.grid_points(dimensions), 0))
    lost = study.ask()
    dimensions[0].suggest(lost)
    study.tell(lost, state=optuna.trial.TrialState.FAIL)  # its worker raised
    trained = []

    def train(trial: object, report: object) -> dict:
        trained.append(trial.values["optim.lr"])
        return {"val_accuracy": 0.5, "test_accuracy": 0.4, "seconds": 1.0, "epochs": 1}

    ticks = iter(range(10**6))  # a clock that ends a looping worker after 50 asks instead of never
    plan = studies.StudyPlan(dimensions, {"train.seed": 0}, trials=2, timeout=50)
    done = studies.run_worker(study, plan, train, lambda _text: None, clock=lambda: next(ticks))
    assert trained == [0.2] and done == {"finished": 1, "pruned": 0, "taken over": 0}
    assert len(study.get_trials()) == 3  # the lost one, the trained one, the one that found the grid handed out


def test_ctrl_c_queues_the_trial_again_and_the_same_command_resumes_it(tmp_path: Path, prepared_dir: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = _args(tmp_path, prepared_dir, storage, "0.003,0.002", 15)
    run = tmp_path / "ck" / "sweeps" / "lr" / "t000_lr0.003_seed0"
    worker = _worker(args, tmp_path / "a.log")
    _wait_for(run / "last.pth", worker)
    worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=120) == 130, (tmp_path / "a.log").read_text()
    assert "queued again" in (tmp_path / "a.log").read_text()
    assert [(t.state.name, t.user_attrs.get("run")) for t in _trials(storage)] == [
        ("FAIL", run.name), ("WAITING", run.name)
    ]  # fmt: skip
    again = subprocess.run([sys.executable, "-m", "cifar_cli", *args], capture_output=True, text=True,
                           cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert again.returncode == 0 and f"Resuming run {run.name} after epoch" in again.stdout, again.stdout
    states = [(t.state.name, t.user_attrs.get("run")) for t in _trials(storage)]
    assert states == [("FAIL", run.name), ("COMPLETE", run.name), ("COMPLETE", "t001_lr0.002_seed0")], states

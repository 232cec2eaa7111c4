"""The SLURM examples in examples/slurm/, run for real on a one-node SLURM that scripts/slurm/local-cluster.sh
brings up from Debian's packages (`make test` installs them where it runs as root with apt-get; elsewhere these
tests are skipped, saying how to run them). Each job is the example script as a user submits it, plus options that
point it at the tiny test data."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "slurm"
CLUSTER_SCRIPT = REPO / "scripts" / "slurm" / "local-cluster.sh"
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch")
HOW_TO_RUN = "run `sudo scripts/slurm/local-cluster.sh install`, then the tests as root"

pytestmark = pytest.mark.xdist_group("slurm")  # one cluster, one worker: the node's 2 CPUs are the jobs'


def _missing() -> str | None:
    if os.geteuid() != 0:
        return f"the one-node SLURM starts its daemons as root; {HOW_TO_RUN}"
    absent = [name for name in DAEMONS if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]
    return f"SLURM is not installed ({', '.join(absent)}); {HOW_TO_RUN}" if absent else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment in which sbatch, scontrol and scancel talk to a fresh one-node cluster."""
    if reason := _missing():
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    env = {
        **os.environ,
        "SLURMCTLD_PORT": str(_free_port()),
        "SLURMD_PORT": str(_free_port()),
        "PATH": f"{Path(sys.executable).parent}:/usr/sbin:{os.environ['PATH']}",  # cifar and torchrun for the jobs
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    for name in [key for key in env if key.startswith(("SLURM_JOB", "SLURM_ARRAY", "CIFAR_"))]:
        del env[name]
    started = subprocess.run([str(CLUSTER_SCRIPT), "up", str(folder)], env=env, capture_output=True, text=True)
    assert started.returncode == 0, started.stdout + started.stderr + _logs(folder)
    env["SLURM_CONF"] = str(folder / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run([str(CLUSTER_SCRIPT), "down", str(folder)], env=env, check=False)


def _logs(folder: Path) -> str:
    return "".join(path.read_text()[-3000:] for path in sorted((folder / "log").glob("*.log")))


def _sbatch(env: dict[str, str], cwd: Path, script: str, *options: str) -> str:
    done = subprocess.run(
        ["sbatch", "--parsable", str(EXAMPLES / script), *options], env=env, cwd=cwd, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().split(";")[0]


def _job(env: dict[str, str], job: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))


def _wait(env: dict[str, str], job: str, done: callable, seconds: float = 240) -> dict[str, str]:
    deadline = time.monotonic() + seconds
    while True:
        state = _job(env, job)
        if done(state):
            return state
        assert time.monotonic() < deadline, f"job {job} is still {state.get('JobState')} ({state.get('Reason')})"
        time.sleep(0.2)


def _ended(state: dict[str, str]) -> bool:
    return state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _history(runs: Path, name: str) -> list[int]:
    try:
        return [record["epoch"] for record in json.loads((runs / name / "history.json").read_text())]
    except (OSError, ValueError):
        return []


def _wait_for_epoch(runs: Path, name: str, env: dict[str, str], job: str) -> None:
    deadline = time.monotonic() + 240
    while not _history(runs, name):
        assert not _ended(_job(env, job)) and time.monotonic() < deadline, f"job {job} ended before its first epoch"
        time.sleep(0.1)


def _train_options(tmp_path: Path, prepared_dir: Path, epochs: int) -> list[str]:
    return [
        "--epochs", str(epochs), "--batch-size", "4", "--precision", "fp32", "--progress", "plain",
        "--processed-dir", str(prepared_dir), "--checkpoint-dir", str(tmp_path / "ck"),
        "--log-dir", str(tmp_path / "runs"), "--set", "model.width_multiplier=2",
    ]  # fmt: skip


def _output(tmp_path: Path) -> str:
    return " ".join("".join(path.read_text() for path in sorted(tmp_path.glob("slurm-*.out"))).split())


def test_a_warned_job_saves_requeues_itself_and_resumes(cluster, tmp_path: Path, prepared_dir: Path) -> None:
    """long-run-cpu.sbatch warned with `scancel --full --signal=USR1` in its second epoch: the run saves, the job
    is requeued (SLURM holds a requeued job about 2 minutes; the test starts it at once, as an operator may), the
    script starts again, the run resumes and ends with every epoch in its history exactly once."""
    job = _sbatch(cluster, tmp_path, "long-run-cpu.sbatch", *_train_options(tmp_path, prepared_dir, 4))
    name, runs = f"long-{job}", tmp_path / "runs"
    _wait_for_epoch(runs, name, cluster, job)
    subprocess.run(["scancel", "--full", "--signal=USR1", job], env=cluster, check=True)
    requeued = _wait(cluster, job, lambda state: state.get("JobState") == "PENDING" or _ended(state))
    assert requeued.get("Restarts") == "1", (requeued, _output(tmp_path))
    # Held about 2 minutes (Reason=BeginTime): start it now, as an operator may.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster, check=True)
    final = _wait(cluster, job, _ended)
    said = _output(tmp_path)
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", (final, said)
    assert "Stopped by SIGUSR1" in said and f"SLURM job {job} requeued" in said, said
    assert f"Resuming run {name} after epoch" in said and "start 1" in said
    assert _history(runs, name) == [1, 2, 3, 4]
    assert (runs / name / "final_metrics.json").is_file()


def test_a_job_ended_by_scancel_leaves_a_run_the_same_script_resumes(
    cluster, tmp_path: Path, prepared_dir: Path
) -> None:
    """train-cpu.sbatch ended with plain `scancel` (SIGTERM, then SIGKILL after KillWait): the run saves at the
    next step and stops, the job is not requeued; the same script submitted again finishes the run."""
    options = [*_train_options(tmp_path, prepared_dir, 500), "--run-name", "kept"]
    job = _sbatch(cluster, tmp_path, "train-cpu.sbatch", *options)
    runs = tmp_path / "runs"
    _wait_for_epoch(runs, "kept", cluster, job)
    subprocess.run(["scancel", job], env=cluster, check=True)
    state = _wait(cluster, job, _ended)
    assert state["JobState"] == "CANCELLED" and state["Restarts"] == "0", state
    deadline = time.monotonic() + 60  # the output is written as the job's processes leave
    while "Stopped by SIGTERM" not in _output(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "Stopped by SIGTERM. last.pth holds epoch" in _output(tmp_path), _output(tmp_path)
    done = torch.load(tmp_path / "ck" / "kept" / "last.pth", weights_only=True)["epoch"]
    options[1] = str(done + 1)
    again = _sbatch(cluster, tmp_path, "train-cpu.sbatch", *options)
    assert _wait(cluster, again, _ended)["JobState"] == "COMPLETED", _output(tmp_path)
    assert f"Resuming run kept after epoch {done}" in _output(tmp_path)
    assert _history(runs, "kept") == list(range(1, done + 2))


def test_a_job_array_of_two_sweep_workers_finishes_one_study(cluster, tmp_path: Path, prepared_dir: Path) -> None:
    optuna = pytest.importorskip("optuna")
    options = [
        "--epochs", "1", "--processed-dir", str(prepared_dir), "--log-dir", str(tmp_path / "runs"),
        "--checkpoint-dir", str(tmp_path / "ck"), "--set", "train.batch_size=16", "--set", "train.precision=fp32",
        "--set", "train.num_threads=1", "--set", "log.progress=plain",
    ]  # fmt: skip
    job = _sbatch(cluster, tmp_path, "sweep-array-cpu.sbatch", *options)
    tasks = [f"{job}_0", f"{job}_1"]
    states = [_wait(cluster, task, _ended) for task in tasks]
    assert [state["JobState"] for state in states] == ["COMPLETED", "COMPLETED"], _output(tmp_path)
    study = optuna.load_study(study_name=f"lr-{job}", storage=f"sqlite:///{tmp_path / f'study-{job}.db'}")
    finished = [trial for trial in study.get_trials() if trial.state.name == "COMPLETE"]
    assert len(finished) == 4 and len({trial.user_attrs["run"] for trial in finished}) == 4  # each grid point once
    counts = [re.search(r"This worker: (\d+) finished", (tmp_path / f"slurm-cifar-sweep-{task}.out").read_text())
              for task in tasks]  # fmt: skip
    assert all(counts) and sum(int(count.group(1)) for count in counts) == 4, _output(tmp_path)


def test_srun_torchrun_with_two_processes_trains(cluster, tmp_path: Path, prepared_dir: Path) -> None:
    job = _sbatch(cluster, tmp_path, "torchrun-cpu.sbatch", *_train_options(tmp_path, prepared_dir, 2))
    state = _wait(cluster, job, _ended)
    assert state["JobState"] == "COMPLETED", _output(tmp_path)
    assert _history(tmp_path / "runs", f"cifar-{job}") == [1, 2]
    assert "2 processes" in _output(tmp_path), _output(tmp_path)
